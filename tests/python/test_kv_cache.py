"""relattn.nn.KVCache: incremental decoding equals the causal model run over the whole sequence.

The reference is the same model's causal forward over all tokens at once (itself checked against the
float64 reference in test_nn.py / test_accuracy.py); decoding feeds a prompt, then one or a few tokens per
call, and must give the rows of the new tokens.
"""
import pytest
import torch

import relattn
from cases import capture
from relattn.nn import (KVCache, RelativeMultiheadAttention, RelativeTransformerEncoder,
                        RelativeTransformerEncoderLayer)

F64 = torch.float64
HAS_CUDA = torch.cuda.is_available() and relattn.cuda_kernels_built()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not HAS_CUDA, reason="needs a GPU and relattn built with its CUDA kernels"))]

SCHEMES = [
    dict(position="shaw", max_distance=3),
    dict(position="shaw", max_distance=4, rel_k=False, per_head_tables=True),
    dict(position="t5", num_buckets=8, max_distance=20, bidirectional=False),
    dict(position="clip_bias", max_distance=2),
    dict(position="alibi"),
    dict(position="none"),
]


def _stack(scheme, dtype=F64, device="cpu", layers=3, norm_first=True, kv_heads=2, seed=0):
    torch.manual_seed(seed)
    layer = RelativeTransformerEncoderLayer(32, 4, 48, dropout=0.0, norm_first=norm_first, num_kv_heads=kv_heads,
                                            **scheme, dtype=dtype)
    encoder = RelativeTransformerEncoder(layer, layers).eval().to(device)
    # Nonzero relative tables (biases start at zero), so that a wrong offset changes the result.
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return encoder


def _decode(model, x, steps, cache, **kwargs):
    """Feeds x[:, :steps[0]], then the next steps[1] tokens, ...; returns the concatenated outputs."""
    outs, start = [], 0
    for n in steps:
        # Key-side inputs cover every cached position.
        call = {name: None if t is None else t[:, :start + n] for name, t in kwargs.items()}
        outs.append(model(x[:, start:start + n], is_causal=True, cache=cache, **call))
        start += n
    return torch.cat(outs, 1)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: "-".join(f"{v}" for v in s.values()))
@pytest.mark.parametrize("steps", [(9,) + (1,) * 10, (1,) * 6 + (5, 3, 2)], ids=["prefill", "mixed"])
def test_incremental_decoding_equals_causal_run(scheme, steps):
    model = _stack(scheme)
    x = torch.randn(3, sum(steps), 32, dtype=F64)
    cache = KVCache(max_length=24)
    with torch.no_grad():
        want = model(x, is_causal=True)
        got = _decode(model, x, steps, cache)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert len(cache) == sum(steps)


@pytest.mark.parametrize("device", DEVICES)
def test_incremental_decoding_with_padding(device):
    # Batched generation with left-padded prompts: the padding stays masked for every later token.
    model = _stack(SCHEMES[0], dtype=torch.float32, device=device, norm_first=False)
    x = torch.randn(3, 14, 32, device=device)
    mask = torch.zeros(3, 14, dtype=torch.bool, device=device)
    mask[1, :3] = True
    mask[2, :6] = True
    with torch.no_grad():
        want = model(x, src_key_padding_mask=mask, is_causal=True)
        got = _decode(model, x, (6, 1, 1, 1, 4, 1), KVCache(20), src_key_padding_mask=mask)
    real = ~mask  # a fully padded query row (row 2, position 0..5) has no keys; compare the real ones
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)


def test_incremental_decoding_with_segment_ids():
    # Two sequences packed in a row; the second one is generated token by token (query ids are read at
    # q_offset + i, so one id tensor over all cached positions serves).
    model = _stack(SCHEMES[1])
    x = torch.randn(2, 15, 32, dtype=F64)
    ids = torch.tensor([[0] * 6 + [1] * 9, [0] * 10 + [1] * 5])
    with torch.no_grad():
        want = model(x, is_causal=True, segment_ids=ids)
        got = _decode(model, x, (8,) + (1,) * 7, KVCache(15), segment_ids=ids)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_attention_module_directly_seq_first():
    torch.manual_seed(0)
    attn = RelativeMultiheadAttention(16, 4, batch_first=False, num_kv_heads=1, position="t5", num_buckets=6,
                                      max_distance=9, dtype=F64).eval()
    torch.nn.init.normal_(attn.rel_bias)
    x = torch.randn(12, 2, 16, dtype=F64)  # [L, B, E]
    cache = KVCache(12)

    def self_attention(token):  # the form an encoder layer uses: key and value are the query tensor
        return attn(token, token, token, cache=cache, is_causal=True)[0]

    with torch.no_grad():
        want = attn(x, is_causal=True)[0]
        got = torch.cat([attn(x[:5], cache=cache, is_causal=True)[0]]
                        + [self_attention(x[t:t + 1]) for t in range(5, 12)])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_reorder_selects_rows_like_beam_search():
    model = _stack(SCHEMES[2])
    x = torch.randn(2, 10, 32, dtype=F64)
    cache = KVCache(16)
    index = torch.tensor([1, 0, 1])
    with torch.no_grad():
        _decode(model, x[:, :6], (6,), cache)
        cache.reorder(index)  # three beams now: row 1, row 0, row 1
        got = _decode(model, x[index, 6:], (1, 3), cache)  # tokens 6..9 of the reordered rows
        want = model(x[index], is_causal=True)[:, 6:]
    assert len(cache) == 10
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_reset_starts_a_new_sequence():
    model = _stack(SCHEMES[4])
    cache = KVCache(8)
    a, b = torch.randn(1, 8, 32, dtype=F64), torch.randn(1, 5, 32, dtype=F64)
    with torch.no_grad():
        _decode(model, a, (8,), cache)
        cache.reset()
        assert len(cache) == 0
        got = _decode(model, b, (2, 1, 2), cache)
        want = model(b, is_causal=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_bad_use_raises():
    model = _stack(SCHEMES[0], layers=1)
    x = torch.randn(2, 5, 32, dtype=F64)
    with pytest.raises(ValueError, match="max_length must be positive"):
        KVCache(0)
    cache = KVCache(6)
    with torch.no_grad():
        model(x, is_causal=True, cache=cache)
        with pytest.raises(ValueError, match=r"5 cached \+ 2 new positions exceed max_length \(6\)"):
            model(x[:, :2], is_causal=True, cache=cache)
        with pytest.raises(ValueError, match="batch 3"):
            model(torch.randn(3, 1, 32, dtype=F64), is_causal=True, cache=cache)
        with pytest.raises(ValueError, match="float32"):
            model.float()(x[:, :1].float(), is_causal=True, cache=cache)
    model.double()
    # Recording gradients through a cache is refused (the cached keys are overwritten in place).
    with pytest.raises(RuntimeError, match="inference"):
        model(x[:, :1], is_causal=True, cache=KVCache(4))
    attn = model.layers[0].self_attn
    with pytest.raises(ValueError, match="causal cross-attention with a cache is not supported"):
        with torch.no_grad():
            attn(x, torch.randn_like(x), is_causal=True, cache=KVCache(8))


def test_cross_attention_projects_the_memory_once():
    torch.manual_seed(0)
    attn = RelativeMultiheadAttention(16, 4, kdim=12, vdim=10, position="none", dtype=F64).eval()
    memory = torch.randn(2, 7, 12, dtype=F64)
    values = torch.randn(2, 7, 10, dtype=F64)
    x = torch.randn(2, 5, 16, dtype=F64)
    cache = KVCache(4)  # max_length bounds the self-attention slots only
    with torch.no_grad():
        first = attn(x, memory, values, cache=cache)[0]
        # Later calls reuse the first call's projected memory, whatever key and value they pass.
        again = attn(x[:, :2], memory.flip(1), values.flip(1), cache=cache)[0]
    torch.testing.assert_close(first, attn(x, memory, values)[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(again, first[:, :2], rtol=1e-12, atol=1e-12)
    assert len(cache) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_decoding_matches_float32(device, dtype):
    # One query row per (batch, head) against a growing cache: on a GPU the tensor-core kernels with a
    # query tile holding a single valid row and q_offset = the cached length.
    model = _stack(SCHEMES[0], dtype=torch.float32, device=device, kv_heads=4)
    x = torch.randn(2, 40, 32, device=device)
    with torch.no_grad():
        want = model(x, is_causal=True)
        half = model.to(dtype)
        got = _decode(half, x.to(dtype), (17,) + (1,) * 23, KVCache(40)).float()
        full = half(x.to(dtype), is_causal=True).float()
    # The half model decoding token by token is as close to float32 as the half model run at once.
    err_decode = (got - want).abs().max().item()
    err_full = (full - want).abs().max().item()
    assert err_decode <= 2 * err_full + 1e-3, (err_decode, err_full)


# ---- static_shapes=True: per-row lengths on the device, whole slots attended -------------------------------

@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: "-".join(f"{v}" for v in s.values()))
def test_static_cache_equals_causal_run(scheme):
    model = _stack(scheme)
    steps = (7, 1, 1, 3, 1, 2)
    x = torch.randn(3, sum(steps), 32, dtype=F64)
    cache = KVCache(max_length=20, static_shapes=True)
    with torch.no_grad():
        want = model(x, is_causal=True)
        got = _decode(model, x, steps, cache)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert cache.lengths.tolist() == [sum(steps)] * 3


def test_static_cache_ragged_prompts_equal_each_sequence_alone():
    """Prompts of different lengths padded on the right, prefilled as one batch; set_lengths to the true
    lengths, then one token per row per step: each row's outputs are its sequence's causal run alone."""
    model = _stack(SCHEMES[2])
    lengths, prompt = [16, 11, 19], [4, 9, 1]
    seqs = [torch.randn(1, n, 32, dtype=F64) for n in lengths]
    cache = KVCache(max_length=28, static_shapes=True)  # finished rows keep taking (unused) tokens: 9 + 18
    outs = [[] for _ in seqs]
    with torch.no_grad():
        padded = torch.zeros(3, max(prompt), 32, dtype=F64)
        for b, (s, p) in enumerate(zip(seqs, prompt)):
            padded[b, :p] = s[0, :p]
        y = model(padded, is_causal=True, cache=cache)
        for b, p in enumerate(prompt):
            outs[b].append(y[b:b + 1, :p])
        cache.set_lengths(torch.tensor(prompt))
        pos = list(prompt)
        while any(p < n for p, n in zip(pos, lengths)):
            # rows that are done feed a dummy token: its slot is past their sequence, and its output unused
            tok = torch.stack([s[0, min(p, n - 1)] for s, p, n in zip(seqs, pos, lengths)]).unsqueeze(1)
            y = model(tok, is_causal=True, cache=cache)
            for b in range(3):
                if pos[b] < lengths[b]:
                    outs[b].append(y[b:b + 1])
            pos = [p + 1 for p in pos]
        for b, s in enumerate(seqs):
            torch.testing.assert_close(torch.cat(outs[b], 1), model(s, is_causal=True), rtol=1e-10, atol=1e-10)


def test_static_cache_without_causal_masks_unwritten_slots():
    """Bidirectional attention over the cached keys (no causal mask): each call equals the model over the
    positions written so far, the slots beyond them hidden by the lengths (not by the zeros they hold)."""
    torch.manual_seed(3)
    mha = RelativeMultiheadAttention(32, 4, position="shaw", max_distance=3, dtype=F64).eval()
    with torch.no_grad():
        for p in mha.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 9, 32, dtype=F64)
    cache = KVCache(max_length=12, static_shapes=True)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[1, 2] = True  # a padding key among the cached ones
    with torch.no_grad():
        start = 0
        for n in (4, 2, 3):
            got = mha(x[:, start:start + n], cache=cache, key_padding_mask=mask)[0]
            keys = x[:, :start + n]
            full = mha(keys, key_padding_mask=mask[:, :start + n])  # every position attends to all written ones
            torch.testing.assert_close(got, full[0][:, start:], rtol=1e-10, atol=1e-10)
            start += n


def test_static_cache_decode_step_compiles_once():
    """A decode step with a static cache is one graph for every step: the lengths change on the device, never a
    shape or a Python int."""
    from torch._dynamo.testing import CompileCounter

    model = _stack(SCHEMES[0], dtype=torch.float32)
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        want = model(x, is_causal=True)
        cache = KVCache(max_length=16, static_shapes=True)
        outs = [model(x[:, :6], is_causal=True, cache=cache)]  # prefill, eager

        counter = CompileCounter()
        step = torch.compile(lambda t: model(t, is_causal=True, cache=cache), backend=counter)
        for t in range(6, 12):
            outs.append(step(x[:, t:t + 1]))
    torch.testing.assert_close(torch.cat(outs, 1), want, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1, counter.frame_count


def test_static_cache_reorder_reset_and_bad_use():
    model = _stack(SCHEMES[0], layers=1)
    x = torch.randn(3, 8, 32, dtype=F64)
    cache = KVCache(max_length=10, static_shapes=True)
    with torch.no_grad():
        model(x[:, :5], is_causal=True, cache=cache)
        cache.set_lengths(torch.tensor([5, 3, 4]))
        cache.reorder(torch.tensor([2, 0]))
        assert cache.lengths.tolist() == [4, 5]
        with pytest.raises(TypeError, match="read cache.lengths"):
            len(cache)
        with pytest.raises(ValueError, match="lengths has 3 rows, the cache 2"):
            cache.set_lengths(torch.tensor([1, 2, 3]))
        with pytest.raises(ValueError, match="lengths must be an integer"):
            cache.set_lengths(torch.tensor([1.0, 2.0]))
        with pytest.raises(ValueError, match="11 new positions exceed max_length"):
            model(torch.randn(2, 11, 32, dtype=F64), is_causal=True, cache=cache)
        cache.reset()
        assert cache.lengths is None
        cache.set_lengths(torch.tensor([2, 0, 1]))  # before the first call: where it writes
        model(x[:, :2], is_causal=True, cache=cache)
        assert cache.lengths.tolist() == [4, 2, 3]
    with pytest.raises(TypeError, match="for static_shapes=True"):
        KVCache(4).lengths


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and relattn built with its CUDA kernels")
def test_cuda_static_cache_step_replays_in_a_cuda_graph():
    """A whole decode step (a 3-layer stack with a static cache) captured once in a CUDA graph, replayed for
    every later token: the same outputs as eager decoding."""
    model = _stack(SCHEMES[2], dtype=torch.float32, device="cuda")
    x = torch.randn(2, 16, 32, device="cuda")
    with torch.no_grad():
        want = model(x, is_causal=True)
        cache = KVCache(max_length=16, static_shapes=True)
        outs = [model(x[:, :4], is_causal=True, cache=cache)]
        token = x[:, 4:5].clone()
        saved = cache.lengths
        # the warm-up steps advance the lengths: rewind them (the same slots are rewritten); capture runs nothing
        graph, out = capture(lambda: model(token, is_causal=True, cache=cache),
                             after_warmup=lambda: cache.set_lengths(saved))
        for t in range(4, 16):
            token.copy_(x[:, t:t + 1])
            graph.replay()
            outs.append(out.clone())
    torch.testing.assert_close(torch.cat(outs, 1), want, rtol=1e-4, atol=1e-4)


def _slot_lengths(cache):
    return [slot[2] if isinstance(slot[2], int) else slot[2].tolist() for slot in cache._slots.values()]


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_a_failed_call_leaves_the_cache_as_it_was(static):
    """A call that raises (here: a key_padding_mask of the wrong length, caught by the op after the keys were
    written) neither advances the lengths nor keeps the slots it created; decoding on after it gives the
    causal run. Stacks, layers and the attention module alike; a decoder's first call that fails does not
    keep the projected memory either."""
    from relattn.nn import RelativeTransformerDecoder, RelativeTransformerDecoderLayer

    model = _stack(SCHEMES[4], layers=2)
    x = torch.randn(2, 7, 32, dtype=F64)
    bad = torch.zeros(2, 3, dtype=torch.bool)
    with torch.no_grad():
        want = model(x, is_causal=True)
        cache = KVCache(max_length=10, static_shapes=static)
        with pytest.raises(RuntimeError, match="key_padding_mask"):
            model(x[:, :4], is_causal=True, cache=cache, src_key_padding_mask=bad)
        assert not cache._slots  # the first call's slots are gone
        outs = [model(x[:, :4], is_causal=True, cache=cache)]
        before = _slot_lengths(cache)
        for call in (lambda: model(x[:, 4:5], is_causal=True, cache=cache, src_key_padding_mask=bad),
                     lambda: model.layers[0](x[:, 4:5], is_causal=True, cache=cache, src_key_padding_mask=bad),
                     lambda: model.layers[1].self_attn(x[:, 4:5], is_causal=True, cache=cache,
                                                       key_padding_mask=bad)):
            with pytest.raises(RuntimeError, match="key_padding_mask"):
                call()
            assert _slot_lengths(cache) == before
        # The last layer's feed-forward fails after both attention modules committed: the stack undoes both.
        def fail(module, args):
            raise RuntimeError("planted failure")

        hook = model.layers[1].linear2.register_forward_pre_hook(fail)
        with pytest.raises(RuntimeError, match="planted failure"):
            model(x[:, 4:5], is_causal=True, cache=cache)
        hook.remove()
        assert _slot_lengths(cache) == before
        for t in range(4, 7):
            outs.append(model(x[:, t:t + 1], is_causal=True, cache=cache))
    torch.testing.assert_close(torch.cat(outs, 1), want, rtol=1e-10, atol=1e-10)

    torch.manual_seed(0)
    decoder = RelativeTransformerDecoder(RelativeTransformerDecoderLayer(32, 4, 48, dropout=0.0, position="t5",
                                                                         dtype=F64), 2).eval()
    memory = torch.randn(2, 6, 32, dtype=F64)
    with torch.no_grad():
        want = decoder(x[:, :3], memory, tgt_is_causal=True)
        cache = KVCache(max_length=10, static_shapes=static)
        with pytest.raises(RuntimeError, match="key_padding_mask"):  # the memory mask: after self-attention
            decoder(x[:, :2], memory.flip(1), tgt_is_causal=True, memory_key_padding_mask=bad, cache=cache)
        assert not cache._slots and not cache._cross_slots
        got = torch.cat([decoder(x[:, :2], memory, tgt_is_causal=True, cache=cache),
                         decoder(x[:, 2:3], memory, tgt_is_causal=True, cache=cache)], 1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_deepcopy_branches_the_decode(static):
    """copy.deepcopy(cache) is an independent cache the same model decodes on: two continuations from one
    prefix each equal their causal run. A model and its cache copied together: the copy's slots belong to the
    copied modules."""
    import copy

    model = _stack(SCHEMES[0], layers=2)
    x = torch.randn(2, 6, 32, dtype=F64)
    y = torch.randn(2, 2, 32, dtype=F64)
    with torch.no_grad():
        cache = KVCache(max_length=8, static_shapes=static)
        model(x[:, :4], is_causal=True, cache=cache)
        branch = copy.deepcopy(cache)
        a = model(x[:, 4:6], is_causal=True, cache=cache)
        b = model(y, is_causal=True, cache=branch)
        torch.testing.assert_close(a, model(x, is_causal=True)[:, 4:], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(b, model(torch.cat([x[:, :4], y], 1), is_causal=True)[:, 4:],
                                   rtol=1e-10, atol=1e-10)
        model2, cache2 = copy.deepcopy((model, branch))
        assert set(cache2._slots) == {layer.self_attn for layer in model2.layers}
        c = model2(x[:, :1], is_causal=True, cache=cache2)
        torch.testing.assert_close(c, model(torch.cat([x[:, :4], y, x[:, :1]], 1), is_causal=True)[:, 6:],
                                   rtol=1e-10, atol=1e-10)
    six, seven = ([[6, 6]] * 2, [[7, 7]] * 2) if static else ([6, 6], [7, 7])
    assert _slot_lengths(cache) == _slot_lengths(branch) == six and _slot_lengths(cache2) == seven


def test_max_length_must_be_an_int():
    with pytest.raises(TypeError, match="max_length must be an int, got float"):
        KVCache(2.5)
    with pytest.raises(TypeError, match="max_length must be an int, got bool"):
        KVCache(True)
    assert KVCache(torch.tensor(3).item()).max_length == 3
