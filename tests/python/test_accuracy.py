"""Accuracy of the forward and backward against the naive float64 reference (SPEC §6), per dtype.

The cases below are chosen, not multiplied out: every feature appears several times, and every pair of
features that meet in the kernel (a table with each bucket source, with masks, GQA, offsets, long rows
that span several key tiles, and the single-bucket fast path of tiles beyond ±M) meets in some case.
Each case runs in float64, float32, float16 and bfloat16; a case with `table_dtype=float32` checks the
mixed-precision tables beside half inputs (and float32 tables beside float64 ones).
"""
import pytest
import torch

from cases import (CPU_BACKWARD_ALGORITHMS, set_cpu_backward, ALL_DTYPES, HALF_DTYPES, Case, assert_accurate, case_id, check_gradients, gradients,
                   make_inputs, run_op, run_reference)

F32 = torch.float32

CASES = [
    # No relative terms: plain attention, with and without grouping, one key tile and several.
    Case("plain", Lq=17, D=16),
    Case("plain_gqa_multi_tile", H=4, Hk=2, Lq=97, Lk=300, D=64, grad_lse=True),
    # Shaw et al.: rel_k / rel_v, shared or per head, with each bucket source.
    Case("shaw_kv_shared_clip", rel_k="shared", rel_v="shared", positions="clip", M=4, Lq=97, D=64),
    Case("shaw_kv_per_head_clip_dv", rel_k="per_head", rel_v="per_head", positions="clip", M=16, Lq=113, Lk=97,
         D=40, Dv=24, table_dtype=F32),
    Case("shaw_k_per_head_t5", rel_k="per_head", positions="t5", Lq=17, Lk=113, D=72),
    Case("shaw_kv_index2d_alibi", rel_k="shared", rel_v="per_head", positions="index2d", alibi=True, Lq=97, Lk=17,
         D=16, Dv=40),
    Case("shaw_kv_index3d_gqa", rel_k="shared", rel_v="per_head", positions="index3d", H=4, Hk=2, Lq=17,
         Lk=97, D=40, padding="random", table_dtype=F32),
    # T5: rel_bias with T5 buckets, bidirectional and not, with offsets.
    Case("t5_bias", rel_bias=True, positions="t5", Lq=113, D=64),
    Case("t5_bias_unidirectional_causal", rel_bias=True, positions="t5", t5=(16, 64, False), causal=True,
         Lq=97, D=40, grad_lse=True),
    Case("t5_bias_rel_k_q_offset", rel_bias=True, rel_k="shared", positions="t5", t5=(8, 20, True),
         q_offset=40, Lq=17, Lk=97, table_dtype=F32),
    Case("t5_bias_rel_v_negative_offset", rel_bias=True, rel_v="per_head", positions="t5", q_offset=-50, Lq=97,
         Lk=113, D=16, Dv=72),
    Case("rel_bias_clip_padding_mqa", rel_bias=True, positions="clip", M=5, H=4, Hk=1, Lq=113, D=72,
         padding="random"),
    # ALiBi with causal masking, padding, grouping, offsets.
    Case("alibi_causal", alibi=True, causal=True, Lq=97, D=72, table_dtype=F32),
    Case("alibi_padding_mqa", alibi=True, padding="random", H=4, Hk=1, Lq=17, Lk=113, D=40),
    Case("alibi_negative_offset_lq_gt_lk", alibi=True, q_offset=-30, Lq=97, Lk=17, D=64, grad_lse=True),
    # Structural positions: explicit per-pair buckets.
    Case("structural_index3d_all_tables_gqa", rel_k="per_head", rel_v="shared", rel_bias=True,
         positions="index3d", R_index=9, alibi=True, padding="random", H=4, Hk=2, Lq=113, Lk=97, D=40, Dv=16),
    # Causal with a negative offset: the first 7 query rows see no key at all (out 0, lse -inf).
    Case("structural_index2d_causal_negative_offset", rel_k="per_head", rel_v="shared", rel_bias=True,
         positions="index2d", causal=True, q_offset=-7, Lq=17, grad_lse=True),
    # Everything at once.
    Case("everything_clip_gqa", rel_k="per_head", rel_v="shared", rel_bias=True, positions="clip", M=8,
         alibi=True, padding="random", causal=True, H=4, Hk=2, q_offset=5, Lq=17, Lk=113, D=72, Dv=40,
         table_dtype=F32),
    Case("everything_t5_mqa", rel_k="shared", rel_v="per_head", rel_bias=True, positions="t5", alibi=True,
         padding="random", H=4, Hk=1, Lq=97, Lk=113, D=64, grad_lse=True),
    # A padded-out batch beside a normal one.
    Case("fully_padded_batch", rel_k="shared", rel_v="shared", rel_bias=True, positions="clip", M=3,
         alibi=True, padding="last_batch", Lq=17, Lk=97, grad_lse=True),
    # Decoding one token with a cache; a single key; a single query and key.
    Case("decode_step_mqa", rel_k="shared", rel_v="per_head", positions="clip", M=16, causal=True, q_offset=112,
         H=4, Hk=1, Lq=1, Lk=113, D=64),
    Case("single_key", rel_v="per_head", rel_bias=True, positions="clip", M=2, Lq=17, Lk=1),
    Case("single_query_single_key", B=1, rel_k="per_head", rel_v="shared", positions="t5", Lq=1, Lk=1, D=40),
    # Long rows (several key tiles): tiles whose distances all lie beyond +M or -M take the kernel's
    # single-bucket path, beside tiles that straddle the clipping window.
    Case("long_rows_beyond_plus_M", rel_k="shared", rel_v="per_head", rel_bias=True, positions="clip", M=4,
         H=2, Lq=97, Lk=300, padding="random", table_dtype=F32),
    Case("long_rows_beyond_minus_M_causal", rel_k="per_head", rel_v="shared", rel_bias=True, positions="clip",
         M=8, causal=True, q_offset=250, H=2, Hk=1, Lq=70, Lk=300, grad_lse=True),
    Case("long_rows_t5_alibi_offset", rel_k="shared", rel_bias=True, rel_v="shared", positions="t5",
         t5=(16, 32, True), alibi=True, q_offset=-100, H=2, Lq=113, Lk=260, D=16),
    # A scale other than 1/sqrt(D).
    Case("custom_scale", rel_k="shared", positions="clip", M=3, scale=0.3, Lq=17, Lk=97, D=40),
    # No relative terms and a negative or zero scale: the CUDA plain instance folds a positive scale into
    # the exponent (the row max of the raw scores stands for the max of the scaled ones), which these
    # scales must not take.
    Case("plain_negative_scale", scale=-0.25, Lq=70, Lk=150, D=64),
    Case("plain_zero_scale_causal", scale=0.0, causal=True, Lq=40, Lk=90, D=32),
]


def _features(case):
    """The features a case switches on, by name (for the coverage check below)."""
    on = {f"rel_k_{case.rel_k}", f"rel_v_{case.rel_v}", case.positions, case.padding and "padding",
          case.rel_bias and "rel_bias", case.alibi and "alibi", case.causal and "causal",
          case.table_dtype and "float32_tables", case.grad_lse and "grad_lse", case.scale and "scale",
          case.Hk != case.H and ("mqa" if case.Hk == 1 else "gqa"), case.Lq != case.Lk and "Lq!=Lk",
          case.Dv != case.D and "Dv!=D", case.Lk > 128 and "several_key_tiles",
          case.q_offset > 0 and "q_offset>0", case.q_offset < 0 and "q_offset<0"}
    on |= {f"L={n}" for n in (case.Lq, case.Lk)} | {f"D={case.D}"}
    return on


def test_cases_cover_every_feature_and_pair():
    """The hand-picked CASES must keep covering every feature and every pairing that meets in the kernel."""
    covered = [_features(c) for c in CASES]
    terms = ["rel_k_shared", "rel_k_per_head", "rel_v_shared", "rel_v_per_head", "rel_bias", "alibi"]
    contexts = ["clip", "t5", "index2d", "index3d", "causal", "padding", "gqa", "mqa", "q_offset>0", "q_offset<0",
                "several_key_tiles", "float32_tables", "Lq!=Lk"]
    singles = ["grad_lse", "scale", "Dv!=D", "L=1", "L=17", "L=97", "L=113", "D=16", "D=40", "D=64", "D=72"]
    missing = [f for f in singles if not any(f in c for c in covered)]
    missing += [(a, b) for a in terms for b in contexts if not any(a in c and b in c for c in covered)]
    assert not missing, f"no case covers {missing}"


def _naive(inp, dtype):
    """The naive formula evaluated in `dtype` (only needed for the half-precision rule)."""
    return run_reference(inp.as_dtype(dtype), dtype) if dtype in HALF_DTYPES else (None, None)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_matches_reference(case, dtype):
    inp = make_inputs(case, dtype)
    out, lse = run_op(inp)
    ref_out, ref_lse = run_reference(inp, torch.float64)
    naive_out, naive_lse = _naive(inp, dtype)

    assert out.dtype == dtype and out.shape == (case.B, case.H, case.Lq, case.Dv)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert lse.shape == (case.B, case.H, case.Lq)
    assert_accurate("out", out, ref_out, dtype, naive_out)
    assert_accurate("lse", lse, ref_lse, dtype, naive_lse)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradients_match_reference(case, dtype):
    check_gradients(case, dtype)


@pytest.mark.parametrize("algorithm", CPU_BACKWARD_ALGORITHMS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cpu_backward_algorithms_match_reference(case, dtype, algorithm, monkeypatch):
    """The CPU backward has three algorithms (csrc/cpu/attention_kernel.cpp): one fused sweep per (batch,
    kv head) (for float16/bfloat16 the strip sweep, which finds Δ exactly before it forms dS); the strip
    sweep with each kv group's query blocks split into chunks whose dk, dv partial sums are added after
    (here 3 chunks: more than some cases have query blocks, so some chunks are empty); and two passes over
    query blocks and key blocks. By default the choice depends on the thread count, so each is forced here
    over the whole grid."""
    set_cpu_backward(monkeypatch, algorithm)
    check_gradients(case, dtype)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_half_fused_backward_over_long_key_rows(dtype, monkeypatch):
    """The fused backward of float16/bfloat16 keeps a query block's P and P∘dP for all of its keys, and
    its blocks shrink as the keys grow (48 rows at 20000 keys, where they are 64 below 16384): 100 query
    rows then run as blocks of 48, 48 and 4, each over a different causal key range."""
    monkeypatch.setenv("RELATTN_CPU_BACKWARD", "fused")
    case = Case("long_keys", B=1, H=2, Hk=1, Lq=100, Lk=20000, D=16, rel_k="shared", rel_v="shared",
                rel_bias=True, positions="t5", causal=True, q_offset=19930, grad_lse=True)
    check_gradients(case, dtype)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_single_key_score_gradients_in_half_precision(dtype):
    """With one key, p = 1 whatever the scores, so dq, dk and d rel_k are exactly 0 — in the float64
    reference and in the naive half-precision formula alike. SPEC §6 then allows the op no error beyond
    the slack; here it gets the lenient slack 1e-3*max|out| (of the forward output).

    Fails today in bfloat16: the backward takes Δ_i = do_i·out_i from `out` as rounded to bfloat16 but
    dp_ij = do_i·(v_j + a^V[β]) in float32, so ds = p·(dp - Δ) is out's rounding error instead of 0."""
    case = Case("single_key_minimal", B=1, H=1, Lq=4, Lk=1, D=16, rel_k="shared", rel_v="shared",
                positions="clip", M=1)
    inp = make_inputs(case, dtype, requires_grad=True)
    out, lse = run_op(inp)
    grads = gradients(out, lse, inp.leaves(), torch.ones_like(out), None)
    slack = 1e-3 * out.abs().max().item()
    for name in ("q", "k", "rel_k"):
        err = grads[name].abs().max().item()
        assert err <= slack, f"d{name}: max |d{name}| = {err:.3g} where the exact value is 0 (allowed {slack:.3g})"
