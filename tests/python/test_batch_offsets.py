"""Per-batch query offsets: ``q_offset`` as an integer tensor ``[B]``, query ``i`` of row ``b`` at ``i + q_offset[b]``.

Held to the float64 reference (which takes the offsets row by row), and to what the form exists for: a batched
call equals each row called alone with its int offset, bit for bit; the offsets are never read on the host, so
``torch.compile`` compiles a decode step once whatever the offsets hold; and a static-shape decode loop over
sequences of different lengths (one preallocated cache, ``causal=True`` masking each row's unfilled slots) gives
what each sequence gives alone.
"""
import pytest
import torch

import relattn
from cases import CPU_BACKWARD_ALGORITHMS, set_cpu_backward, ALL_DTYPES, Case, assert_accurate, capture, case_id, check_forward, check_gradients, make_inputs
from reference import reference_attention

CUDA = torch.cuda.is_available()


def offsets_for(case, seed=0):
    """[B] int64 offsets of both signs, distinct per row, some beyond the clip distance."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-case.Lq, case.Lk, (case.B,), generator=g)


def with_offsets(offsets):
    def op(inp):
        kw = {**inp.kwargs, "q_offset": offsets.to(inp.q.device)}
        return relattn.attention(inp.q, inp.k, inp.v, **kw, return_lse=True)

    def ref(inp, dtype):
        kw = {**inp.kwargs, "q_offset": offsets.to(inp.q.device)}
        return reference_attention(inp.q, inp.k, inp.v, **kw, dtype=dtype)

    return op, ref


CASES = [
    Case("shaw_kv_clip_causal", rel_k="per_head", rel_v="shared", positions="clip", M=6, causal=True, B=3, H=2,
         Lq=70, Lk=150, D=16),
    Case("t5_bias_gqa_alibi", rel_bias=True, positions="t5", t5=(16, 64, True), alibi=True, B=3, H=4, Hk=2, Lq=40,
         Lk=140, D=8),
    Case("all_terms_padding", rel_k="shared", rel_v="per_head", rel_bias=True, positions="clip", M=4,
         padding="random", causal=True, B=4, H=2, Lq=20, Lk=90, D=8, Dv=12),
    Case("index3d_causal", rel_k="per_head", rel_bias=True, positions="index3d", R_index=5, causal=True, B=2, H=2,
         Lq=30, Lk=60, D=8),
    Case("plain_causal", causal=True, B=3, H=2, Lq=65, Lk=200, D=8),
]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_matches_reference(case, dtype):
    check_forward(case, dtype, *with_offsets(offsets_for(case)))


@pytest.mark.parametrize("algorithm", CPU_BACKWARD_ALGORITHMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradients_match_reference(case, dtype, algorithm, monkeypatch):
    set_cpu_backward(monkeypatch, algorithm)
    op, ref = with_offsets(offsets_for(case))
    check_gradients(case.with_(grad_lse=True), dtype, op, ref)


def _tables(H, D, g, dtype=torch.float64, requires_grad=False):
    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(requires_grad)
    return dict(rel_k=t(H, 9, D), rel_v=t(9, D), rel_bias=t(H, 9), buckets=relattn.clip_buckets(4),
                alibi_slopes=relattn.alibi_slopes(H).to(dtype))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("algorithm", CPU_BACKWARD_ALGORITHMS)
def test_batched_equals_each_row_alone(causal, algorithm, monkeypatch):
    """Row b of a call with offsets [B] is the call on row b alone with q_offset = offsets[b]: the same bits in
    out, lse and dq/dk/dv, and the table gradients are the sums of the rows' (to rounding)."""
    set_cpu_backward(monkeypatch, algorithm)
    B, H, Lq, Lk, D = 4, 2, 70, 150, 8
    g = torch.Generator().manual_seed(2)
    q = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float32, requires_grad=True)
    k, v = (torch.randn(B, H, Lk, D, generator=g, requires_grad=True) for _ in range(2))
    tables = _tables(H, D, g, torch.float32, requires_grad=True)
    offsets = torch.tensor([0, 80, -30, 149], dtype=torch.int32)
    out, lse = relattn.attention(q, k, v, **tables, causal=causal, q_offset=offsets, return_lse=True)
    grad_out = torch.randn(out.shape, generator=g)
    diffable = (q, k, v, tables["rel_k"], tables["rel_v"], tables["rel_bias"])
    grads = torch.autograd.grad(out, diffable, grad_out)
    table_sums = [torch.zeros_like(t) for t in diffable[3:]]
    for b in range(B):
        rows = [x[b:b + 1] for x in (q, k, v)]
        o_b, lse_b = relattn.attention(*rows, **tables, causal=causal, q_offset=int(offsets[b]), return_lse=True)
        assert torch.equal(out[b:b + 1], o_b) and torch.equal(lse[b:b + 1], lse_b), f"row {b}"
        g_b = torch.autograd.grad(o_b, (*rows, *diffable[3:]), grad_out[b:b + 1])
        for name, got, want in zip("qkv", grads[:3], g_b[:3]):
            assert torch.equal(got[b:b + 1], want), f"d{name} of row {b}"
        for acc, part in zip(table_sums, g_b[3:]):
            acc += part
    for name, got, want in zip(("rel_k", "rel_v", "rel_bias"), grads[3:], table_sums):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"d{name}")


def test_forms_agree():
    """int32, int64, a 0-d tensor and a strided [B] view give the same bits as the int offset they hold; equal
    offsets in every row give the int form's result."""
    B, H, Lq, Lk, D = 3, 2, 20, 50, 8
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for L in (Lq, Lk, Lk))
    tables = _tables(H, D, g, torch.float32)
    want = relattn.attention(q, k, v, **tables, causal=True, q_offset=17)
    for offset in (torch.tensor(17), torch.tensor(17, dtype=torch.int32), torch.full((B,), 17),
                   torch.full((B,), 17, dtype=torch.int32), torch.full((B, 2), 17)[:, 1],
                   torch.full((2 * B,), 17, dtype=torch.int16)[::2]):
        got = relattn.attention(q, k, v, **tables, causal=True, q_offset=offset)
        assert torch.equal(got, want), (offset.dtype, offset.shape, offset.stride())


def test_gradcheck():
    B, H, Lq, Lk, D = 3, 2, 6, 9, 4
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64, requires_grad=True) for L in (Lq, Lk, Lk))
    tables = _tables(H, D, g, requires_grad=True)
    tables.pop("alibi_slopes")
    offsets = torch.tensor([-2, 3, 7])
    names = ("rel_k", "rel_v", "rel_bias")

    def f(q, k, v, rel_k, rel_v, rel_bias):
        return relattn.attention(q, k, v, rel_k=rel_k, rel_v=rel_v, rel_bias=rel_bias, buckets=tables["buckets"],
                                 causal=True, q_offset=offsets, alibi_slopes=relattn.alibi_slopes(H).double())

    assert torch.autograd.gradcheck(f, (q, k, v, *(tables[n] for n in names)))


def test_opcheck():
    B, H, Lq, Lk, D = 2, 2, 5, 9, 4
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, H, L, D, generator=g, requires_grad=True) for L in (Lq, Lk, Lk))
    rel_k = torch.randn(9, D, generator=g, requires_grad=True)
    args = (q, k, v, rel_k, None, None, relattn.clip_buckets(4), None, None, None, True, None, 0)
    kwargs = dict(q_offsets=torch.tensor([1, 4], dtype=torch.int32))
    torch.library.opcheck(torch.ops.relattn.attention_forward.default, args, kwargs)


def test_compile_once_for_any_offsets():
    """The offsets are data, not a shape or a constant: torch.compile traces a decode step once, and every
    call after it, whatever the offsets hold, equals eager."""
    from torch._dynamo.testing import CompileCounter

    B, H, Lk, D = 3, 2, 64, 8
    g = torch.Generator().manual_seed(6)
    tables = _tables(H, D, g, torch.float32)
    k, v = (torch.randn(B, H, Lk, D, generator=g) for _ in range(2))

    def step(q, offsets):
        return relattn.attention(q, k, v, **tables, causal=True, q_offset=offsets)

    counter = CompileCounter()
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for t in range(5):
        q = torch.randn(B, H, 1, D, generator=g)
        offsets = torch.tensor([t, 3 * t + 1, Lk - 1 - t], dtype=torch.int32)
        torch.testing.assert_close(compiled(q, offsets), step(q, offsets), rtol=0, atol=0)
    assert counter.frame_count == 1


def _decode_inputs(lengths, H=2, Hk=1, D=8, seed=7, device="cpu", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    seqs = [(torch.randn(1, H, n, D, generator=g, dtype=dtype), torch.randn(1, Hk, n, D, generator=g, dtype=dtype),
             torch.randn(1, Hk, n, D, generator=g, dtype=dtype)) for n in lengths]
    tables = _tables(H, D, g, dtype)
    return [tuple(x.to(device) for x in s) for s in seqs], {n: t.to(device) for n, t in tables.items()}


def _static_decode(seqs, tables, prompt, Lmax, Hk, D):
    """Decodes every sequence of `seqs` in one batch from a preallocated cache [B, Hk, Lmax, D]: rows start with
    prompts of their own lengths and take one token per step; one call per step with static shapes."""
    B = len(seqs)
    device, dtype = seqs[0][0].device, seqs[0][0].dtype
    k_cache = torch.zeros(B, Hk, Lmax, D, device=device, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    lengths = torch.tensor(prompt, device=device)
    for b, (_, k, v) in enumerate(seqs):
        k_cache[b, :, :prompt[b]] = k[0, :, :prompt[b]]
        v_cache[b, :, :prompt[b]] = v[0, :, :prompt[b]]
    outs = [[] for _ in range(B)]
    steps = max(s[0].shape[2] - p for s, p in zip(seqs, prompt))
    batch = torch.arange(B, device=device)
    for _ in range(steps):
        # each row's next token (rows that are done repeat their last one: their results are not used)
        pos = torch.minimum(lengths, torch.tensor([s[0].shape[2] - 1 for s in seqs], device=device))
        q = torch.stack([s[0][0, :, int(p)] for s, p in zip(seqs, pos)]).unsqueeze(2)  # [B, H, 1, D]
        k_new = torch.stack([s[1][0, :, int(p)] for s, p in zip(seqs, pos)])
        v_new = torch.stack([s[2][0, :, int(p)] for s, p in zip(seqs, pos)])
        k_cache[batch, :, pos] = k_new
        v_cache[batch, :, pos] = v_new
        out = relattn.attention(q, k_cache, v_cache, **tables, causal=True, q_offset=pos)
        for b in range(B):
            if int(lengths[b]) < seqs[b][0].shape[2]:
                outs[b].append(out[b:b + 1])
        lengths = lengths + 1
    return [torch.cat(o, dim=2) for o in outs]


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
def test_ragged_decode_equals_each_sequence_alone(device):
    """A static-shape decode loop over sequences of different lengths, one call per step for the whole batch
    (offsets = each row's cached length), gives each sequence's causal attention over itself."""
    lengths, prompt, Lmax, Hk, D = [23, 31, 12], [5, 17, 1], 40, 1, 8
    dtype = torch.float64 if device == "cpu" else torch.float32
    seqs, tables = _decode_inputs(lengths, Hk=Hk, D=D, device=device, dtype=dtype)
    got = _static_decode(seqs, tables, prompt, Lmax, Hk, D)
    for b, (q, k, v) in enumerate(seqs):
        want = relattn.attention(q, k, v, **tables, causal=True)[:, :, prompt[b]:]
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(got[b], want, rtol=tol, atol=tol, msg=f"sequence {b}")


# (The errors name the op's q_offsets and the tensor q_offset that Python callers pass.)
_NAME = r"q_offsets \(per-batch query offsets; in Python a tensor q_offset\)"


@pytest.mark.parametrize("offsets,match", [
    (torch.tensor([1.0, 2.0]), _NAME + " must have an integer dtype"),
    (torch.tensor([True, False]), _NAME + " must have an integer dtype"),
    (torch.tensor([1, 2, 3]), _NAME + r" must be \[B\] = \[2\]"),
    (torch.zeros(2, 1, dtype=torch.int32), r"must be \[B\] = \[2\], got shape \[2, 1\]"),
    (torch.tensor([0, 2**40]), _NAME + " holds an offset that does not fit in int32"),
])
def test_bad_offsets(offsets, match):
    q = torch.randn(2, 2, 3, 8)
    with pytest.raises(RuntimeError, match=match):
        relattn.attention(q, q, q, q_offset=offsets)


def test_offsets_exclude_the_single_segment_ids_form():
    q = torch.randn(2, 2, 3, 8)
    ids = torch.zeros(2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="needs an int q_offset"):
        relattn.attention(q, q, q, q_offset=torch.tensor([0, 0]), segment_ids=ids)
    # the pair form works: equal to the int offset
    got = relattn.attention(q, q, q, q_offset=torch.tensor([1, 1]), segment_ids=(ids, ids), causal=True)
    torch.testing.assert_close(got, relattn.attention(q, q, q, q_offset=1, segment_ids=(ids, ids), causal=True),
                               rtol=0, atol=0)


@pytest.mark.skipif(not CUDA, reason="needs a second device")
def test_cuda_offsets_on_another_device():
    q = torch.randn(2, 2, 3, 8, device="cuda")
    with pytest.raises(RuntimeError, match=r"q_offsets \(.*\) is on cpu but q is on cuda"):
        relattn.attention(q, q, q, q_offset=torch.tensor([0, 1]))


def test_empty_inputs():
    q = torch.randn(0, 2, 3, 8, requires_grad=True)
    out = relattn.attention(q, q, q, q_offset=torch.zeros(0, dtype=torch.int32), causal=True)
    assert out.shape == (0, 2, 3, 8)
    out.sum().backward()
    assert q.grad.shape == q.shape
    q = torch.randn(2, 2, 0, 8)
    k = torch.randn(2, 2, 5, 8)
    assert relattn.attention(q, k, k, q_offset=torch.tensor([1, 2])).shape == (2, 2, 0, 8)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cuda_offsets_match_reference(case, dtype):
    """CUDA: forward and every gradient against the float64 reference (float32: SIMT kernels; bf16: tensor
    cores)."""
    offsets = offsets_for(case)
    op, ref = with_offsets(offsets)

    def cuda_op(inp):
        moved = type(inp)(*(t.cuda() for t in (inp.q, inp.k, inp.v)),
                          {n: t.cuda() if isinstance(t, torch.Tensor) else t for n, t in inp.kwargs.items()})
        return op(moved)

    inp = make_inputs(case, dtype)
    out, lse = cuda_op(inp)
    ref_out, ref_lse = ref(inp.as_dtype(torch.float64), torch.float64)
    naive = ref(inp.as_dtype(dtype), dtype)[0] if dtype == torch.bfloat16 else None
    assert_accurate("out", out.cpu(), ref_out, dtype, naive)
    assert_accurate("lse", lse.cpu(), ref_lse, torch.float32)
    check_gradients(case.with_(grad_lse=True), dtype, cuda_op, ref)  # through .cuda(): CPU leaves, CUDA kernels


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_decode_step_replays_in_a_graph_with_new_offsets():
    """A decode step with tensor offsets captured once in a CUDA graph: replays after the offsets (and the cache)
    change in place give what eager gives, and no call syncs."""
    B, H, Lk, D = 3, 4, 300, 64
    g = torch.Generator(device="cuda").manual_seed(8)
    tables = {n: t.cuda() for n, t in _tables(H, D, torch.Generator().manual_seed(8), torch.float32).items()}
    k, v = (torch.randn(B, 2, Lk, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    offsets = torch.tensor([10, 150, 299], device="cuda", dtype=torch.int32)

    def step():
        return relattn.attention(q, k, v, **tables, causal=True, q_offset=offsets)

    graph, out = capture(step)
    moves = torch.tensor([1, -7, 13], device="cuda", dtype=torch.int32)
    pairs = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            offsets.add_(moves)
            q.copy_(torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=g))
            graph.replay()
            pairs.append((out.clone(), step()))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for got, want in pairs:  # compared outside: the comparison itself synchronises
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(pairs[0][0], pairs[-1][0])  # the replays did follow the new offsets and queries
