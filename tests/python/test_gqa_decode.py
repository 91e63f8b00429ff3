"""Decode steps on the CPU (Lq <= 16): grouped-query heads packed, long caches split over the keys.

Packing: with H > Hk, one forward task stacks the G = H / Hk query heads of a kv group into one tile, so each
key and value tile is read once for the group (csrc/cpu/attention_kernel.cpp, forward_block). Every per-head
term then acts on a slice of the tile's rows: the row tables (rel_k per head, rel_bias), ALiBi, dropout, rel_v
and the outputs. Held to the float64 reference, and to the same call with the kv heads repeated (H kv heads:
the unpacked path), which must agree to rounding and draw the same dropout mask.

Splitting: with fewer than 64 (batch row, head tile) tasks and more than 2048 keys, the keys are cut into
chunks (one task each) whose partial outputs and log-sum-exps are combined (flash-decoding). Held to the
reference with every term, dropout, padding that masks whole chunks or whole rows, segments and per-row
offsets that leave chunks empty; and a row computed alone (split) equals that row of a 64-row batch (not
split) to rounding.
"""
import pytest
import torch

import relattn
from cases import ALL_DTYPES, Case, case_id, check_forward, check_gradients, make_inputs
from dropout_reference import keep_factors
from reference import reference_attention

# Lq <= 16 and G·Lq <= 256 pack; the last two cases sit just beyond each limit (unpacked), for contrast.
CASES = [
    Case("decode_shaw_kv_bias_causal", rel_k="per_head", rel_v="per_head", rel_bias=True, positions="clip", M=6,
         causal=True, B=3, H=8, Hk=2, Lq=1, Lk=150, q_offset=149, D=16),
    Case("decode_t5_alibi_padding", rel_bias=True, positions="t5", t5=(16, 64, True), alibi=True, padding="random",
         B=2, H=6, Hk=3, Lq=1, Lk=300, q_offset=299, D=8),
    Case("chunk5_shared_tables", rel_k="shared", rel_v="shared", positions="clip", M=4, causal=True, B=2, H=4,
         Hk=1, Lq=5, Lk=70, q_offset=65, D=8, Dv=12),
    Case("chunk16_index3d", rel_k="per_head", rel_v="shared", rel_bias=True, positions="index3d", R_index=5,
         B=2, H=4, Hk=2, Lq=16, Lk=40, D=8),
    Case("mqa_g16_chunk16_plain", causal=True, B=1, H=16, Hk=1, Lq=16, Lk=200, q_offset=184, D=8),
    Case("beyond_lq_chunk17", rel_k="per_head", rel_v="per_head", positions="clip", M=3, causal=True, B=2, H=4,
         Hk=2, Lq=17, Lk=60, q_offset=43, D=8),
    Case("beyond_rows_g32_chunk9", rel_bias=True, positions="clip", M=3, B=1, H=32, Hk=1, Lq=9, Lk=40, D=8),
]


def op(inp, **extra):
    return relattn.attention(inp.q, inp.k, inp.v, **inp.kwargs, return_lse=True, **extra)


def ref(inp, dtype):
    return reference_attention(inp.q, inp.k, inp.v, **inp.kwargs, dtype=dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_matches_reference(case, dtype):
    check_forward(case, dtype, op, ref)


def repeated_kv(inp):
    """k and v with each kv head repeated G times: the same attention without grouping (not packed)."""
    G = inp.q.shape[1] // inp.k.shape[1]
    return inp.k.repeat_interleave(G, dim=1), inp.v.repeat_interleave(G, dim=1)


@pytest.mark.parametrize("case", CASES[:5], ids=case_id)
def test_packed_equals_repeated_heads(case):
    inp = make_inputs(case, torch.float64)
    k, v = repeated_kv(inp)
    out, lse = op(inp)
    out_rep, lse_rep = relattn.attention(inp.q, k, v, **inp.kwargs, return_lse=True)
    torch.testing.assert_close(out, out_rep, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, lse_rep, rtol=0, atol=1e-12)


def test_packed_dropout_draws_each_heads_own_mask():
    """The mask is a function of (seed, b, h, i, j): packing must hand each head's rows their own head index.
    Checked against the reference with the mask rebuilt independently, and against the unpacked call."""
    case = Case("decode_dropout", rel_v="per_head", rel_bias=True, positions="clip", M=5, B=2, H=8, Hk=2, Lq=3,
                Lk=90, D=8)
    inp = make_inputs(case, torch.float64)
    seed, p = 0x0123_4567_89AB_CDEF, 0.3
    kw = dict(dropout_p=p, dropout_seed=torch.tensor([seed]))
    out, lse = op(inp, **kw)
    keep = keep_factors(seed, p, case.B, case.H, case.Lq, case.Lk)
    ref_out, ref_lse = reference_attention(inp.q, inp.k, inp.v, **inp.kwargs, dropout_keep=keep)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-12)
    k, v = repeated_kv(inp)
    torch.testing.assert_close(out, relattn.attention(inp.q, k, v, **inp.kwargs, **kw), rtol=0, atol=1e-12)


def test_packed_with_batch_offsets_and_segments():
    """Per-row tensor offsets (a static-cache decode step) and packed sequences (the pair form of the ids)."""
    B, H, Hk, Lq, Lk, D = 3, 6, 2, 2, 64, 8
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, h, L, D, generator=g, dtype=torch.float64) for h, L in ((H, Lq), (Hk, Lk), (Hk, Lk)))
    tables = dict(rel_k=torch.randn(H, 7, D, generator=g, dtype=torch.float64),
                  rel_v=torch.randn(7, D, generator=g, dtype=torch.float64),
                  rel_bias=torch.randn(H, 7, generator=g, dtype=torch.float64), buckets=relattn.clip_buckets(3),
                  alibi_slopes=relattn.alibi_slopes(H).double())
    offsets = torch.tensor([62, 10, 40])
    k_ids = (torch.arange(Lk) >= 30).int().expand(B, Lk).contiguous()  # two sequences per row
    q_ids = torch.stack([k_ids[b, (offsets[b] + torch.arange(Lq)).clamp(max=Lk - 1)] for b in range(B)])
    kw = dict(**tables, causal=True, q_offset=offsets, segment_ids=(q_ids, k_ids))
    out, lse = relattn.attention(q, k, v, **kw, return_lse=True)
    ref_out, ref_lse = reference_attention(q, k, v, **kw)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_gradients_after_a_packed_forward(dtype):
    """The backward (not packed) takes the packed forward's out and lse."""
    check_gradients(CASES[0].with_(grad_lse=True), dtype, op, ref)
    check_gradients(CASES[3], dtype, op, ref)


# --------------------------------------------------------------------------------------------------
# Key splitting (flash-decoding): B · (H / packed heads) < 64 tasks and Lk > 2048
# --------------------------------------------------------------------------------------------------

SPLIT_CASES = [
    Case("split_shaw_kv_bias_causal", rel_k="per_head", rel_v="shared", rel_bias=True, positions="clip", M=40,
         causal=True, B=1, H=4, Hk=1, Lq=1, Lk=4100, q_offset=4099, D=16),
    Case("split_t5_alibi_last_batch_masked", rel_bias=True, positions="t5", t5=(16, 4096, True), alibi=True,
         padding="last_batch", B=2, H=2, Lq=3, Lk=2049, D=8, Dv=12),
    Case("split_causal_early_rows", rel_k="shared", rel_v="per_head", positions="clip", M=8, causal=True, B=2,
         H=6, Hk=2, Lq=16, Lk=6000, q_offset=2500, D=8),  # chunks past position 2515 are empty
    Case("split_index3d", rel_v="per_head", rel_bias=True, positions="index3d", R_index=9, B=1, H=2, Lq=2,
         Lk=2300, D=8),
]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", SPLIT_CASES, ids=case_id)
def test_split_matches_reference(case, dtype):
    test_forward_matches_reference(case, dtype)


def test_split_padding_masks_whole_chunks():
    """A row whose first chunks are all padding, and one whose keys are all padding (out 0, lse -inf)."""
    case = Case("split_padding", rel_v="shared", rel_bias=True, positions="clip", M=5, B=3, H=2, Lq=2, Lk=5000,
                D=8)
    inp = make_inputs(case, torch.float64)
    mask = torch.zeros(case.B, case.Lk, dtype=torch.bool)
    mask[0, :4000] = True
    mask[1, 100:] = True
    mask[2] = True
    kw = {**inp.kwargs, "key_padding_mask": mask}
    out, lse = relattn.attention(inp.q, inp.k, inp.v, **kw, return_lse=True)
    ref_out, ref_lse = reference_attention(inp.q, inp.k, inp.v, **kw)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-12)
    assert (out[2] == 0).all() and torch.isneginf(lse[2]).all()


def test_split_with_dropout_segments_and_batch_offsets():
    """A static-cache step (per-row offsets; chunks past a row's position empty) over packed sequences with
    dropout: the mask is the same function of (b, h, i, j) whichever chunk draws it."""
    B, H, Hk, Lq, Lk, D = 2, 4, 2, 2, 4500, 8
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, h, L, D, generator=g, dtype=torch.float64) for h, L in ((H, Lq), (Hk, Lk), (Hk, Lk)))
    tables = dict(rel_k=torch.randn(H, 9, D, generator=g, dtype=torch.float64),
                  rel_v=torch.randn(9, D, generator=g, dtype=torch.float64),
                  rel_bias=torch.randn(H, 9, generator=g, dtype=torch.float64), buckets=relattn.clip_buckets(4))
    offsets = torch.tensor([4490, 2600])
    k_ids = (torch.arange(Lk) >= 1000).int().expand(B, Lk).contiguous()  # two sequences per row
    q_ids = torch.stack([k_ids[b, offsets[b] + torch.arange(Lq)] for b in range(B)])
    seed, p = 0x0F0E_0D0C_0B0A_0908, 0.2
    kw = dict(**tables, causal=True, q_offset=offsets, segment_ids=(q_ids, k_ids))
    out, lse = relattn.attention(q, k, v, **kw, return_lse=True, dropout_p=p, dropout_seed=torch.tensor([seed]))
    keep = keep_factors(seed, p, B, H, Lq, Lk)
    ref_out, ref_lse = reference_attention(q, k, v, **kw, dropout_keep=keep)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_split_row_equals_that_row_of_an_unsplit_batch(dtype):
    """64 batch rows with one head are 64 tasks: not split. Row 5 alone is one task: split into chunks."""
    case = Case("batch64", rel_k="per_head", rel_v="per_head", rel_bias=True, positions="clip", M=16, alibi=True,
                causal=True, B=64, H=1, Lq=1, Lk=4200, q_offset=4199, D=16)
    inp = make_inputs(case, dtype)
    out, lse = op(inp)
    row = lambda t: t[5:6]  # noqa: E731
    out5, lse5 = relattn.attention(row(inp.q), row(inp.k), row(inp.v), **inp.kwargs, return_lse=True)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out5, row(out), rtol=0, atol=tol)
    torch.testing.assert_close(lse5, row(lse), rtol=0, atol=tol)


def test_split_gradients():
    """The backward takes the combined out and lse of a split forward."""
    check_gradients(SPLIT_CASES[0].with_(Lk=2100, q_offset=2099, grad_lse=True), torch.float64, op, ref)
