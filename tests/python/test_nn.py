"""Tests of relattn.nn: the attention layer, encoder layer and stack, and the absolute encodings."""
import datetime
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import relattn
import relattn.nn as rnn
from reference import reference_attention

SCHEMES = rnn.POSITION_SCHEMES
E, H = 32, 4


def scheme_kwargs(position, max_distance=4):
    """Small tables, so short test sequences reach the clipped / log-spaced buckets."""
    if position == "t5":
        return {"num_buckets": 8, "max_distance": 12}
    return {"max_distance": max_distance} if position in ("shaw", "clip_bias") else {}


def make_attention(position, max_distance=4, **kwargs):
    torch.manual_seed(0)
    m = rnn.RelativeMultiheadAttention(E, H, position=position, **scheme_kwargs(position, max_distance), **kwargs)
    # Non-zero tables and biases, so every term is exercised.
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def padding_mask(B, L):
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[1, L - 3:] = True
    return mask


def copy_mha_weights(mha: nn.MultiheadAttention, ours: rnn.RelativeMultiheadAttention):
    with torch.no_grad():
        for proj, w, b in zip((ours.q_proj, ours.k_proj, ours.v_proj), mha.in_proj_weight.chunk(3),
                              mha.in_proj_bias.chunk(3)):
            proj.weight.copy_(w)
            proj.bias.copy_(b)
        ours.out_proj.load_state_dict(mha.out_proj.state_dict())


def randomize_(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))


# -- RelativeMultiheadAttention ---------------------------------------------------------------------


@pytest.mark.parametrize("position", SCHEMES)
@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_shapes(position, batch_first):
    m = rnn.RelativeMultiheadAttention(E, H, position=position, batch_first=batch_first, num_kv_heads=2)
    q = torch.randn(2, 7, E)
    kv = torch.randn(2, 11, E)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    out, weights = m(q, kv, kv)
    assert weights is None
    assert out.shape == q.shape
    assert m(q)[0].shape == q.shape  # self-attention: key and value default to query


def test_attention_kdim_vdim():
    m = rnn.RelativeMultiheadAttention(E, H, kdim=12, vdim=20, position="t5")
    out, _ = m(torch.randn(3, 5, E), torch.randn(3, 9, 12), torch.randn(3, 9, 20))
    assert out.shape == (3, 5, E)


@pytest.mark.parametrize("position", SCHEMES)
def test_attention_matches_reference(position):
    """The layer wires projections, tables, buckets and slopes into the SPEC's formula."""
    m = make_attention(position, per_head_tables=True, num_kv_heads=2)
    x = torch.randn(2, 9, E)
    mask = padding_mask(2, 9)
    out, _ = m(x, key_padding_mask=mask, is_causal=True)

    B, L, Dh = 2, 9, E // H
    q = m.q_proj(x).view(B, L, H, Dh).transpose(1, 2)
    k = m.k_proj(x).view(B, L, 2, Dh).transpose(1, 2)
    v = m.v_proj(x).view(B, L, 2, Dh).transpose(1, 2)
    ref, _ = reference_attention(q, k, v, rel_k=m.rel_k, rel_v=m.rel_v, rel_bias=m.rel_bias, buckets=m.buckets,
                                 alibi_slopes=m.alibi_slopes, key_padding_mask=mask, causal=True)
    ref = m.out_proj(ref.transpose(1, 2).reshape(B, L, E))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_attention_buckets_and_tables():
    m = rnn.RelativeMultiheadAttention(E, H, position="shaw", max_distance=3, rel_v=False)
    assert m.rel_k.shape == (7, E // H) and m.rel_v is None
    assert torch.equal(m.buckets, relattn.clip_buckets(3))
    m = rnn.RelativeMultiheadAttention(E, H, position="shaw", max_distance=3, per_head_tables=True)
    assert m.rel_k.shape == (H, 7, E // H) and m.rel_v.shape == (H, 7, E // H)
    m = rnn.RelativeMultiheadAttention(E, H, position="t5", num_buckets=8, max_distance=20, bidirectional=False)
    assert m.rel_bias.shape == (H, 8)
    assert torch.equal(m.buckets, relattn.t5_buckets(8, 20, False))
    m = rnn.RelativeMultiheadAttention(E, H, position="clip_bias", max_distance=5)
    assert m.rel_bias.shape == (H, 11)
    m = rnn.RelativeMultiheadAttention(E, H, position="alibi")
    assert torch.equal(m.alibi_slopes, relattn.alibi_slopes(H))
    assert "alibi_slopes" not in m.state_dict() and "buckets" not in m.state_dict()


@pytest.mark.parametrize("position", SCHEMES)
def test_attention_padding(position):
    """Padded keys do not influence the output; a row with every key padded gives no NaN."""
    m = make_attention(position)
    x = torch.randn(2, 8, E)
    mask = padding_mask(2, 8)
    out, _ = m(x, key_padding_mask=mask)
    x2 = x.clone()
    x2[1, 5:] = torch.randn(3, E)  # change only the padded positions of sequence 1
    out2, _ = m(x2, key_padding_mask=mask)
    torch.testing.assert_close(out[:, :5], out2[:, :5])
    # Sequence 1's unpadded part alone gives the same result as with padding.
    alone, _ = m(x[1:, :5])
    torch.testing.assert_close(out[1:, :5], alone, atol=1e-5, rtol=1e-5)

    all_padded = torch.ones(2, 8, dtype=torch.bool)
    out, _ = m(x, key_padding_mask=all_padded)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, m.out_proj.bias.expand_as(out))


@pytest.mark.parametrize("position,kwargs", [
    ("shaw", {}), ("shaw", {"per_head_tables": True}), ("shaw", {"rel_v": False}), ("shaw", {"rel_k": False}),
    ("t5", {}), ("clip_bias", {}), ("alibi", {}), ("none", {}), ("shaw", {"num_kv_heads": 1}),
])
def test_attention_gradients_reach_every_parameter(position, kwargs):
    m = make_attention(position, **kwargs)
    x = torch.randn(2, 10, E, requires_grad=True)
    out, _ = m(x, key_padding_mask=padding_mask(2, 10), is_causal=True)
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert set(m.relative_tables()) <= {n for n, _ in m.named_parameters()}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_none_matches_multihead_attention(batch_first, causal):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first)
    randomize_(mha)
    ours = rnn.RelativeMultiheadAttention(E, H, position="none", batch_first=batch_first)
    copy_mha_weights(mha, ours)
    B, L = 3, 9
    x = torch.randn(B, L, E) if batch_first else torch.randn(L, B, E)
    mask = padding_mask(B, L)
    attn_mask = torch.ones(L, L, dtype=torch.bool).triu(1) if causal else None  # True = masked
    expected, _ = mha(x, x, x, key_padding_mask=mask, need_weights=False, attn_mask=attn_mask)
    got, _ = ours(x, x, x, key_padding_mask=mask, is_causal=causal)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Cross-attention with another key length.
    kv = torch.randn(B, 13, E) if batch_first else torch.randn(13, B, E)
    torch.testing.assert_close(ours(x, kv, kv)[0], mha(x, kv, kv, need_weights=False)[0], atol=1e-5, rtol=1e-5)


def test_attention_causal_alias_and_mask_hint():
    m = make_attention("t5")
    x = torch.randn(2, 6, E)
    by_name = m(x, is_causal=True)[0]
    torch.testing.assert_close(m(x, causal=True)[0], by_name)
    hint = nn.Transformer.generate_square_subsequent_mask(6)
    torch.testing.assert_close(m(x, attn_mask=hint, is_causal=True)[0], by_name)
    # Causal: the first output row depends on the first token only.
    x2 = x.clone()
    x2[:, 1:] = torch.randn(2, 5, E)
    torch.testing.assert_close(m(x2, is_causal=True)[0][:, 0], by_name[:, 0])


def test_attention_rel_index():
    """An explicit rel_index equal to the clipped distance buckets gives the same result."""
    m = make_attention("clip_bias", max_distance=3)
    x = torch.randn(2, 7, E)
    i = torch.arange(7)
    rel_index = ((i.view(1, -1) - i.view(-1, 1)).clamp(-3, 3) + 3)
    torch.testing.assert_close(m(x, rel_index=rel_index)[0], m(x)[0])
    with pytest.raises(ValueError, match="rel_index"):
        make_attention("alibi")(x, rel_index=rel_index)


def test_attention_errors():
    with pytest.raises(ValueError, match="dropout"):
        rnn.RelativeMultiheadAttention(E, H, dropout=1.5)
    with pytest.raises(ValueError, match="divisible"):
        rnn.RelativeMultiheadAttention(30, 4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        rnn.RelativeMultiheadAttention(E, H, num_kv_heads=3)
    with pytest.raises(ValueError, match="position"):
        rnn.RelativeMultiheadAttention(E, H, position="rope")
    with pytest.raises(ValueError, match="rel_k"):
        rnn.RelativeMultiheadAttention(E, H, position="shaw", rel_k=False, rel_v=False)
    m = rnn.RelativeMultiheadAttention(E, H)
    x = torch.randn(2, 5, E)
    with pytest.raises(ValueError, match="need_weights"):
        m(x, need_weights=True)
    with pytest.raises(ValueError, match="attn_mask"):
        m(x, attn_mask=torch.zeros(5, 5))
    with pytest.raises(ValueError, match="bool"):
        m(x, key_padding_mask=torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"query must be 3-D \[B, L, E\], got shape \[5, 32\]"):
        m(torch.randn(5, E))
    with pytest.raises(ValueError, match=r"query must be 3-D \[L, B, E\]"):
        rnn.RelativeMultiheadAttention(E, H, batch_first=False)(torch.randn(E))
    with pytest.raises(ValueError, match="same batch size .* got 2, 3, 3"):
        m(x, torch.randn(3, 5, E))
    with pytest.raises(ValueError, match="key and value must have the same length .* got 7 and 8"):
        m(x, torch.randn(2, 7, E), torch.randn(2, 8, E))
    with pytest.raises(ValueError, match=r"query must have 32 features \(embed_dim\)"):
        m(torch.randn(2, 5, E + 1))
    with pytest.raises(ValueError, match=r"value must have 6 features \(vdim\)"):
        rnn.RelativeMultiheadAttention(E, H, kdim=4, vdim=6)(x, torch.randn(2, 3, 4), torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="key must be a tensor"):
        m(x, [1, 2])


def test_attention_positional_arguments_follow_multihead_attention():
    """forward's positional order is nn.MultiheadAttention's (query, key, value, key_padding_mask,
    need_weights, attn_mask, average_attn_weights, is_causal): a call written for torch means the same here
    (average_attn_weights is accepted and not read), or raises where relattn cannot follow it."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    randomize_(mha)
    ours = rnn.RelativeMultiheadAttention(E, H, position="none")
    copy_mha_weights(mha, ours)
    x = torch.randn(2, 6, E)
    mask = nn.Transformer.generate_square_subsequent_mask(6)
    for average in (True, False):
        want = mha(x, x, x, None, False, mask, average, True)[0]
        torch.testing.assert_close(ours(x, x, x, None, False, mask, average, True)[0], want, atol=1e-5, rtol=1e-5)
    plain = mha(x, x, x, None, False, None, True)[0]
    torch.testing.assert_close(ours(x, x, x, None, False, None, True)[0], plain, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attn_mask is only accepted together with is_causal=True"):
        ours(x, x, x, None, False, mask, True)  # torch: an arbitrary mask, averaged weights; not causal


def test_attention_external_tables():
    """Tables passed in are shared; wrong names or shapes are rejected."""
    a = rnn.RelativeMultiheadAttention(E, H, position="shaw", max_distance=4)
    b = rnn.RelativeMultiheadAttention(E, H, position="shaw", max_distance=4, tables=a.relative_tables())
    assert b.rel_k is a.rel_k and b.rel_v is a.rel_v
    plain = torch.randn(H, 9)
    c = rnn.RelativeMultiheadAttention(E, H, position="clip_bias", max_distance=4, tables={"rel_bias": plain})
    assert isinstance(c.rel_bias, nn.Parameter) and c.rel_bias.data_ptr() == plain.data_ptr()
    with pytest.raises(ValueError, match="shape"):
        rnn.RelativeMultiheadAttention(E, H, position="clip_bias", max_distance=3, tables={"rel_bias": plain})
    with pytest.raises(ValueError, match="tables"):
        rnn.RelativeMultiheadAttention(E, H, position="t5", tables=a.relative_tables())


# -- encoder layer and stack ----------------------------------------------------------------------------


def copy_encoder_layer_weights(theirs: nn.TransformerEncoderLayer, ours: rnn.RelativeTransformerEncoderLayer):
    copy_mha_weights(theirs.self_attn, ours.self_attn)
    for name in ("linear1", "linear2", "norm1", "norm2"):
        getattr(ours, name).load_state_dict(getattr(theirs, name).state_dict())


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_none_matches_torch(norm_first, activation):
    torch.manual_seed(0)
    theirs = nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, activation=activation, batch_first=True,
                                        norm_first=norm_first)
    randomize_(theirs)
    ours = rnn.RelativeTransformerEncoderLayer(E, H, 64, dropout=0.0, activation=activation, norm_first=norm_first,
                                               position="none")
    copy_encoder_layer_weights(theirs, ours)
    x = torch.randn(3, 10, E)
    mask = padding_mask(3, 10)
    for mode in ("train", "eval"):  # eval mode takes torch's fused fast path
        getattr(theirs, mode)()
        getattr(ours, mode)()
        torch.testing.assert_close(ours(x, src_key_padding_mask=mask)[:, :7],
                                   theirs(x, src_key_padding_mask=mask)[:, :7], atol=1e-5, rtol=1e-5)
    causal = nn.Transformer.generate_square_subsequent_mask(10)
    torch.testing.assert_close(ours(x, is_causal=True), theirs(x, src_mask=causal, is_causal=True),
                               atol=1e-5, rtol=1e-5)


def test_encoder_none_matches_torch():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=True, norm_first=True)
    theirs = nn.TransformerEncoder(layer, 3, nn.LayerNorm(E), enable_nested_tensor=False)
    randomize_(theirs)
    ours = rnn.RelativeTransformerEncoder(
        rnn.RelativeTransformerEncoderLayer(E, H, 64, dropout=0.0, norm_first=True, position="none"), 3,
        nn.LayerNorm(E))
    for t, o in zip(theirs.layers, ours.layers):
        copy_encoder_layer_weights(t, o)
    ours.norm.load_state_dict(theirs.norm.state_dict())
    x = torch.randn(2, 8, E)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_encoder_layer_batch_first_false_and_errors():
    layer = rnn.RelativeTransformerEncoderLayer(E, H, 64, batch_first=False, position="alibi")
    x = torch.randn(6, 2, E)
    assert layer(x).shape == x.shape
    with pytest.raises(ValueError, match="src_mask"):
        layer(x, src_mask=torch.zeros(6, 6))
    with pytest.raises(ValueError, match="dropout"):
        rnn.RelativeTransformerEncoderLayer(E, H, attention_dropout=-0.1)
    with pytest.raises(ValueError, match="activation"):
        rnn.RelativeTransformerEncoderLayer(E, H, activation="swish")
    custom = rnn.RelativeTransformerEncoderLayer(E, H, 64, activation=torch.tanh)
    assert custom.activation is torch.tanh


@pytest.mark.parametrize("position", SCHEMES)
def test_encoder_gradients_reach_every_parameter(position):
    torch.manual_seed(0)
    layer = rnn.RelativeTransformerEncoderLayer(E, H, 64, dropout=0.0, position=position, **scheme_kwargs(position))
    enc = rnn.RelativeTransformerEncoder(layer, 2, nn.LayerNorm(E))
    randomize_(enc)
    out = enc(torch.randn(2, 9, E), src_key_padding_mask=padding_mask(2, 9))
    out.square().sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_encoder_share_relative_tables():
    layer = rnn.RelativeTransformerEncoderLayer(E, H, 64, position="t5")
    enc = rnn.RelativeTransformerEncoder(layer, 3, share_relative_tables=True)
    first = enc.layers[0].self_attn.rel_bias
    assert all(l.self_attn.rel_bias is first for l in enc.layers)
    assert sum(1 for n, _ in enc.named_parameters() if n.endswith("rel_bias")) == 1
    randomize_(enc)
    enc(torch.randn(2, 5, E)).sum().backward()
    assert first.grad is not None
    # Round trip into a fresh shared stack keeps the tie and the values.
    fresh = rnn.RelativeTransformerEncoder(layer, 3, share_relative_tables=True)
    fresh.load_state_dict(enc.state_dict())
    assert all(l.self_attn.rel_bias is fresh.layers[0].self_attn.rel_bias for l in fresh.layers)
    torch.testing.assert_close(fresh.layers[2].self_attn.rel_bias, first)
    unshared = rnn.RelativeTransformerEncoder(layer, 3)
    assert unshared.layers[0].self_attn.rel_bias is not unshared.layers[1].self_attn.rel_bias
    # Weights whose layers hold different tables cannot load into one shared table (each entry would
    # overwrite it; the last one won, silently).
    randomize_(unshared)
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"layers.1.self_attn.rel_bias differs from layers.0.self_attn.rel_bias"):
            fresh.load_state_dict(unshared.state_dict(), strict=strict)
    decoder = rnn.RelativeTransformerDecoder(rnn.RelativeTransformerDecoderLayer(E, H, 64, position="t5"), 2,
                                             share_relative_tables=True)
    other = rnn.RelativeTransformerDecoder(rnn.RelativeTransformerDecoderLayer(E, H, 64, position="t5"), 2)
    randomize_(other)
    with pytest.raises(RuntimeError, match=r"RelativeTransformerDecoder: the weights' layers.1.self_attn.rel_bias"):
        decoder.load_state_dict(other.state_dict())
    nn.Sequential(fresh).load_state_dict(nn.Sequential(enc).state_dict())  # under a prefix
    with pytest.raises(RuntimeError, match=r"the weights' 0.layers.1.self_attn.rel_bias differs"):
        nn.Sequential(fresh).load_state_dict(nn.Sequential(unshared).state_dict())


def test_encoder_checkpoint_matches():
    torch.manual_seed(0)
    layer = rnn.RelativeTransformerEncoderLayer(E, H, 64, dropout=0.0, position="shaw", max_distance=4)
    plain = rnn.RelativeTransformerEncoder(layer, 3)
    randomize_(plain)
    ckpt = rnn.RelativeTransformerEncoder(layer, 3, checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 7, E)
    mask = padding_mask(2, 7)
    grads = []
    for enc in (plain, ckpt):
        out = enc(x, src_key_padding_mask=mask, is_causal=True)
        out.square().sum().backward()
        grads.append([p.grad for p in enc.parameters()])
    torch.testing.assert_close(ckpt(x), plain(x))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_encoder_checkpoint_with_attention_dropout_matches():
    """Activation checkpointing recomputes each layer in the backward: with attention dropout the recomputed
    forward must draw the same mask (torch.utils.checkpoint restores the RNG state, so the seed drawn again
    is the same), or the gradients would belong to another mask."""
    torch.manual_seed(0)
    layer = rnn.RelativeTransformerEncoderLayer(E, H, 64, dropout=0.0, attention_dropout=0.3, position="shaw",
                                                max_distance=4)
    plain = rnn.RelativeTransformerEncoder(layer, 3)
    randomize_(plain)
    ckpt = rnn.RelativeTransformerEncoder(layer, 3, checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 7, E)
    outs, grads = [], []
    for enc in (plain, ckpt):
        torch.manual_seed(11)
        out = enc(x, src_key_padding_mask=padding_mask(2, 7))
        out.square().sum().backward()
        outs.append(out)
        grads.append([p.grad for p in enc.parameters()])
    torch.testing.assert_close(outs[1], outs[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    torch.manual_seed(12)
    assert not torch.allclose(plain(x), outs[0])  # another seed, another mask


def clipped_distance_index(L, K, dtype=torch.int64):
    i = torch.arange(L)
    return ((i.view(1, -1) - i.view(-1, 1)).clamp(-K, K) + K).to(dtype)


@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpoint"])
@pytest.mark.parametrize("position", ["shaw", "clip_bias"])
def test_encoder_rel_index(position, checkpoint):
    """Structural positions through the encoder layer and stack: a rel_index equal to the clipped distance
    buckets gives the layers' own result, output and every gradient (int64 and int32 ids, 2-D and per
    batch); a per-batch rel_index gives each batch what that batch's 2-D index gives on its own."""
    torch.manual_seed(0)
    K, B, L = 3, 2, 9
    layer = rnn.RelativeTransformerEncoderLayer(E, H, 64, dropout=0.0, position=position, max_distance=K)
    enc = rnn.RelativeTransformerEncoder(layer, 3, checkpoint=checkpoint)
    randomize_(enc)
    x = torch.randn(B, L, E)
    mask = padding_mask(B, L)

    def run(module, **kw):
        module.zero_grad()
        out = module(x, src_key_padding_mask=mask, **kw)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in module.parameters()]

    for module in (enc.layers[0], enc):
        want, want_grads = run(module)
        for ids in (clipped_distance_index(L, K), clipped_distance_index(L, K, torch.int32),
                    clipped_distance_index(L, K).expand(B, L, L)):
            got, got_grads = run(module, rel_index=ids)
            torch.testing.assert_close(got, want)
            for a, b in zip(got_grads, want_grads):
                torch.testing.assert_close(a, b)

    # Per batch: batch 1 sees reversed distances; each batch matches its own 2-D index.
    per_batch = torch.stack([clipped_distance_index(L, K), clipped_distance_index(L, K).flip(0, 1)])
    with torch.no_grad():
        out = enc(x, src_key_padding_mask=mask, rel_index=per_batch)
        for b in range(B):
            alone = enc(x[b:b + 1], src_key_padding_mask=mask[b:b + 1], rel_index=per_batch[b])
            torch.testing.assert_close(out[b:b + 1], alone)
        assert not torch.allclose(out[1], enc(x, src_key_padding_mask=mask)[1])


def test_encoder_rel_index_errors():
    layer = rnn.RelativeTransformerEncoderLayer(E, H, 64, position="clip_bias", max_distance=3)
    enc = rnn.RelativeTransformerEncoder(layer, 2)
    x = torch.randn(2, 5, E)
    ids = clipped_distance_index(5, 3)
    # An int64 id past int32 must not wrap around into [0, R) on the stack's int32 conversion.
    # On the CPU the error names the id as given (no clamped 2147483647).
    for bad, span in ((2**32 + 1, r"\[0, 4294967297\]"), (-(2**32) + 1, r"\[-4294967295, 6\]"), (7, r"\[0, 7\]")):
        wrong = ids.clone()
        wrong[1, 2] = bad
        with pytest.raises(RuntimeError, match="rel_index holds bucket ids in " + span):
            enc(x, rel_index=wrong)
        with pytest.raises(RuntimeError, match="rel_index holds bucket ids in " + span):
            rnn.RelativeTransformerDecoder(rnn.RelativeTransformerDecoderLayer(E, H, 64, position="clip_bias",
                                                                               max_distance=3), 1)(
                x, x, rel_index=wrong)
    with pytest.raises(RuntimeError, match="rel_index must be"):
        enc(x, rel_index=ids[:4])
    alibi = rnn.RelativeTransformerEncoder(rnn.RelativeTransformerEncoderLayer(E, H, 64, position="alibi"), 2)
    with pytest.raises(ValueError, match="rel_index needs a relative table"):
        alibi(x, rel_index=ids)


def test_encoder_deepnorm():
    N = 4
    layer = rnn.RelativeTransformerEncoderLayer(E, H, 64, dropout=0.0, position="clip_bias", max_distance=4)
    enc = rnn.RelativeTransformerEncoder(layer, N, deepnorm=True)
    alpha, beta = (2 * N) ** 0.25, (8 * N) ** -0.25
    assert all(l.residual_alpha == pytest.approx(alpha) for l in enc.layers)
    w = enc.layers[0].linear1.weight
    expected_std = beta * math.sqrt(2.0 / (w.shape[0] + w.shape[1]))
    assert w.std().item() == pytest.approx(expected_std, rel=0.1)
    # The post-LN sub-layer is LN(alpha * x + f(x)).
    l0 = enc.layers[0]
    x = torch.randn(2, 6, E)
    h = l0.norm1(alpha * x + l0.self_attn(x)[0])
    expected = l0.norm2(alpha * h + l0.linear2(l0.activation(l0.linear1(h))))
    torch.testing.assert_close(l0(x), expected)
    assert torch.isfinite(enc(x)).all()
    with pytest.raises(ValueError, match="post-LN"):
        rnn.RelativeTransformerEncoder(rnn.RelativeTransformerEncoderLayer(E, H, norm_first=True), 2, deepnorm=True)


# -- absolute encodings --------------------------------------------------------------------------------


def test_sinusoidal_encoding():
    d = 10
    pe = rnn.SinusoidalPositionalEncoding(d)
    x = torch.zeros(2, 7, d)
    out = pe(x)
    pos, i = 5, 2
    assert out[0, pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / d)), abs=1e-6)
    assert out[1, pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / d)), abs=1e-6)
    cached = rnn.SinusoidalPositionalEncoding(d, max_len=4)
    torch.testing.assert_close(cached(x[:, :3]), out[:, :3])
    torch.testing.assert_close(cached(x), out)  # longer than the cache: computed on the fly
    assert rnn.SinusoidalPositionalEncoding(7)(torch.zeros(1, 3, 7)).shape == (1, 3, 7)
    assert len(pe.state_dict()) == 0 and len(cached.state_dict()) == 0
    # A cast leaves the table float32 (as in C++): inputs within and beyond it are encoded alike.
    big = rnn.SinusoidalPositionalEncoding(d, max_len=200).half()
    assert big.table.dtype == torch.float32
    x = torch.zeros(1, 300, d)
    torch.testing.assert_close(big(x[:, :200]), big(x)[:, :200], rtol=0, atol=0)
    torch.testing.assert_close(big(x), rnn.SinusoidalPositionalEncoding(d)(x), rtol=0, atol=0)
    torch.testing.assert_close(big.to(torch.float64).table, rnn.SinusoidalPositionalEncoding(d, max_len=200).table)


def test_casts_keep_alibi_slopes_float32():
    """ALiBi's slopes follow the module's device, not its dtype (as in C++): with 12 heads (not a power of two)
    they would lose digits in half precision, and slope·|d| grows with the distance."""
    want = relattn.alibi_slopes(12)
    assert not torch.equal(want.bfloat16().float(), want)
    for m in (rnn.RelativeMultiheadAttention(48, 12, position="alibi", dtype=torch.bfloat16),
              rnn.RelativeMultiheadAttention(48, 12, position="alibi").bfloat16(),
              rnn.RelativeMultiheadAttention(48, 12, position="alibi").to(torch.float16).double()):
        assert m.alibi_slopes.dtype == torch.float32 and torch.equal(m.alibi_slopes, want)
    m = rnn.RelativeMultiheadAttention(48, 12, position="alibi").bfloat16()
    x = torch.randn(1, 9, 48, dtype=torch.bfloat16)
    q, k, v = (p(x).view(1, 9, 12, 4).transpose(1, 2) for p in (m.q_proj, m.k_proj, m.v_proj))
    heads = relattn.attention(q, k, v, alibi_slopes=want, causal=True)
    torch.testing.assert_close(m(x, is_causal=True)[0], m.out_proj(heads.transpose(1, 2).reshape(1, 9, 48)),
                               rtol=0, atol=0)


def test_learned_encoding():
    pe = rnn.LearnedPositionalEncoding(8, E)
    x = torch.randn(2, 8, E)
    torch.testing.assert_close(pe(x), x + pe.weight)
    pe(x[:, :3]).sum().backward()
    assert pe.weight.grad[:3].abs().sum() > 0 and pe.weight.grad[3:].abs().sum() == 0
    with pytest.raises(ValueError, match="max_len=8"):
        pe(torch.randn(2, 9, E))
    torch.manual_seed(0)
    assert abs(rnn.LearnedPositionalEncoding(400, 50, init_std=0.5).weight.std().item() - 0.5) < 0.02
    with pytest.raises(ValueError, match="init_std must be finite and >= 0, got -1"):
        rnn.LearnedPositionalEncoding(4, 8, init_std=-1)


def test_mlp_encoding():
    pe = rnn.MLPPositionalEncoding(E, hidden=16)
    torch.testing.assert_close(pe.positions(5).squeeze(1), torch.tensor([0, 0.25, 0.5, 0.75, 1.0]))
    assert pe.positions(1).item() == 0.0
    raw = rnn.MLPPositionalEncoding(E, hidden=16, scale=1.0)
    torch.testing.assert_close(raw.positions(4).squeeze(1), torch.arange(4.0))
    x = torch.randn(2, 5, E)
    out = pe(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert all(p.grad is not None for p in pe.parameters())
    with pytest.raises(ValueError, match="expected input"):
        pe(torch.randn(2, 5, E + 1))


# -- torch.compile and state_dict ---------------------------------------------------------------------


@pytest.mark.parametrize("position", SCHEMES)
def test_attention_compiles(position):
    torch._dynamo.reset()
    m = make_attention(position, num_kv_heads=2)
    x = torch.randn(2, 9, E)
    mask = padding_mask(2, 9)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out_c = compiled(x, key_padding_mask=mask, is_causal=True)[0]
    out_c.square().sum().backward()
    grads_c = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    out = m(x, key_padding_mask=mask, is_causal=True)[0]
    out.square().sum().backward()
    torch.testing.assert_close(out_c, out)
    for a, p in zip(grads_c, m.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_encoder_and_encodings_compile():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = rnn.RelativeTransformerEncoderLayer(E, H, 64, dropout=0.0, position="shaw", max_distance=4,
                                                per_head_tables=True)
    enc = rnn.RelativeTransformerEncoder(layer, 2, nn.LayerNorm(E), share_relative_tables=True, checkpoint=True)
    model = nn.ModuleList([rnn.SinusoidalPositionalEncoding(E), rnn.LearnedPositionalEncoding(16, E),
                           rnn.MLPPositionalEncoding(E, hidden=8), enc])

    def forward(x, mask, rel_index):
        for pe in model[:3]:
            x = pe(x)
        return model[3](x, src_key_padding_mask=mask, rel_index=rel_index)

    x = torch.randn(2, 9, E)
    mask = padding_mask(2, 9)
    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    # Distance buckets, then structural positions (an int64 per-batch index: the stack's int32 conversion
    # is traced too).
    for rel_index in (None, torch.randint(0, 9, (2, 9, 9))):
        model.zero_grad()
        out_c = compiled(x, mask, rel_index)
        out_c.square().sum().backward()
        grads_c = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        out = forward(x, mask, rel_index)
        out.square().sum().backward()
        torch.testing.assert_close(out_c, out)
        for a, p in zip(grads_c, model.parameters()):
            torch.testing.assert_close(a, p.grad)


@pytest.mark.parametrize("position", SCHEMES)
def test_state_dict_round_trip(position):
    def build(seed):
        torch.manual_seed(seed)
        layer = rnn.RelativeTransformerEncoderLayer(E, H, 64, dropout=0.0, position=position, num_kv_heads=2,
                                                    **scheme_kwargs(position))
        return nn.ModuleDict({"pe": rnn.MLPPositionalEncoding(E, hidden=8),
                              "table": rnn.LearnedPositionalEncoding(12, E),
                              "enc": rnn.RelativeTransformerEncoder(layer, 2, nn.LayerNorm(E))})

    a, b = build(0), build(1)
    randomize_(a)
    state = a.state_dict()
    assert not any(k.endswith(("buckets", "alibi_slopes")) for k in state)
    b.load_state_dict(state)
    x = torch.randn(2, 6, E)
    run = lambda m: m["enc"](m["table"](m["pe"](x)))  # noqa: E731
    torch.testing.assert_close(run(b), run(a))
    for name, tensor in b.state_dict().items():
        torch.testing.assert_close(tensor, state[name])


# -- distributed data parallel ------------------------------------------------------------------------


def _ddp_model():
    torch.manual_seed(0)
    layer = rnn.RelativeTransformerEncoderLayer(16, 2, 32, dropout=0.0, norm_first=True, position="shaw",
                                                max_distance=3, per_head_tables=True)
    return nn.Sequential(rnn.RelativeTransformerEncoder(layer, 2, nn.LayerNorm(16), share_relative_tables=True),
                         nn.Linear(16, 3))


def _ddp_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, 16, generator=g), torch.randint(0, 3, (8, 6), generator=g)


def _train_steps(model, x, y, steps=3):
    """SGD steps; returns the gradients of the first step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = None
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        if first is None:
            first = [p.grad.clone() for p in model.parameters()]
        opt.step()
    return first


def _ddp_worker(rank, world_size, store_path, result_path):
    torch.set_num_threads(1)
    # A timeout, so that a rank that fails leaves the other one waiting for minutes, not gloo's 30.
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        model = nn.parallel.DistributedDataParallel(_ddp_model())
        x, y = _ddp_batch()
        rows = slice(rank * 4, rank * 4 + 4)
        grads = _train_steps(model, x[rows], y[rows])
        torch.save({"grads": grads, "params": [p.detach() for p in model.module.parameters()]},
                   f"{result_path}.{rank}")
        # Both ranks are done with every collective before either closes its connections, and the DDP
        # reducer is gone before the process group: a worker once aborted in teardown in CI ("terminate
        # called without an active exception", one run in about twenty).
        del model
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_gloo_matches_single_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "result")), nprocs=2, join=True)
    model = _ddp_model()
    x, y = _ddp_batch()
    grads = _train_steps(model, x, y)
    for rank in range(2):
        result = torch.load(f"{tmp_path / 'result'}.{rank}")
        assert len(result["grads"]) == len(grads)
        for a, b in zip(result["grads"], grads):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        for a, b in zip(result["params"], model.parameters()):
            torch.testing.assert_close(a, b.detach(), atol=1e-6, rtol=1e-5)


# -- depth ------------------------------------------------------------------------------------------


def test_deep_pre_ln_stack_trains_on_workbench_task():
    """24 pre-LN layers train on the workbench task for 200 steps without NaN or divergence."""
    from relattn.workbench import WindowTask, build_model, train_model

    task = WindowTask()
    model = build_model("shaw", task, d_model=16, nhead=2, num_layers=24, train_length=12, max_distance=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threading only adds synchronisation
    try:
        losses = train_model(model, task, steps=200, length=12, batch_size=16, lr=3e-3, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert all(math.isfinite(loss) for loss in losses)
    start, end = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert max(losses) < 1.5 * start  # no divergence
    assert end < start - 0.03  # it learns
    for p in model.parameters():
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("position", ("shaw", "t5", "alibi"))
def test_attention_dropout_in_training_only(position):
    """Attention-weight dropout acts in training mode, through relattn.attention's fused dropout with a
    seed drawn from torch's generator, and not at all in eval mode."""
    torch.manual_seed(0)
    m = make_attention(position, dropout=0.3)
    plain = make_attention(position)
    plain.load_state_dict(m.state_dict())
    x = torch.randn(2, 9, E)
    m.eval()
    plain.eval()
    assert torch.equal(m(x)[0], plain(x)[0])
    m.train()
    plain.train()
    torch.manual_seed(5)
    a = m(x)[0]
    torch.manual_seed(5)
    b = m(x)[0]
    assert torch.equal(a, b)
    assert not torch.allclose(a, plain(x)[0])
    # The same computation spelled out with the functional op and the seed the module draws.
    torch.manual_seed(5)
    seed = relattn.draw_dropout_seed(x)
    q = m.q_proj(x).view(2, 9, H, E // H).transpose(1, 2)
    k = m.k_proj(x).view(2, 9, H, E // H).transpose(1, 2)
    v = m.v_proj(x).view(2, 9, H, E // H).transpose(1, 2)
    heads = relattn.attention(q, k, v, rel_k=m.rel_k, rel_v=m.rel_v, rel_bias=m.rel_bias, buckets=m.buckets,
                              alibi_slopes=m.alibi_slopes, scale=m.scale, dropout_p=0.3, dropout_seed=seed)
    torch.testing.assert_close(a, m.out_proj(heads.transpose(1, 2).reshape(2, 9, E)))
    a.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters() if p.requires_grad)
