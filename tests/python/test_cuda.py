"""The CUDA forward and backward against the naive float64 reference (SPEC §6) and against the CPU op.

Every test here is skipped when torch sees no GPU or relattn was built without its CUDA kernels. The
cases are those of test_accuracy.py plus shapes that matter to the CUDA kernels only: every padded head
dim of the tensor-core kernel (32, 64, 96, 128, 256) and dims in between, D != Dv, lengths around the
tile sizes (1, 63, 65, 127, 129, 257), long rows that reach the single-bucket path, many buckets (the
per-row tables in global scratch), strided and misaligned inputs, and index spaces past 2^31.
Environment switches of the binding (csrc/cuda/attention_kernel.cpp) force the other code paths:
RELATTN_CUDA_TABLES=global|smem, RELATTN_CUDA_KERNEL=simt and RELATTN_CUDA_SPLITS=N (key chunks).

The backward is held to the same rule for every gradient (dq, dk, dv, d rel_k, d rel_v, d rel_bias), on the
same cases, and must be deterministic: bit-identical gradients run to run, with or without
torch.use_deterministic_algorithms(True) (no atomics across blocks).
"""
import math
import os

import pytest
import torch

import relattn
from cases import ALL_DTYPES, HALF_DTYPES, Case, Inputs, assert_accurate, case_id, gradients, make_grad_outputs, \
    make_inputs, max_abs_error, error_bound, run_op, run_reference
from reference import reference_attention
from test_accuracy import CASES as ACCURACY_CASES
from test_empty import CASES as EMPTY_CASES

# Older torch builds refuse cuBLAS calls under torch.use_deterministic_algorithms(True) unless this is set
# before the first cuBLAS call (the float64 reference uses cuBLAS); harmless where it is not needed.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

HAS_CUDA = torch.cuda.is_available() and relattn.cuda_kernels_built()
pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and relattn built with its CUDA kernels")

F32 = torch.float32

# Shapes that only the CUDA kernels care about (tile edges, padded head dims, table placement).
CUDA_CASES = [
    Case("hd32_plain_odd", B=2, H=3, Lq=65, Lk=127, D=32),
    # no relative tables: the plain forward instance, 128-row tiles at head dims 96 and 128
    Case("hd96_plain_alibi_causal", alibi=True, causal=True, q_offset=-5, Lq=257, Lk=250, D=96),
    Case("hd128_plain_padding_gqa", padding="random", H=4, Hk=2, Lq=130, Lk=129, D=100, Dv=128),
    Case("hd64_shaw_clip", rel_k="shared", rel_v="shared", positions="clip", M=16, Lq=129, Lk=257, D=64),
    Case("hd96_t5_causal", rel_bias=True, positions="t5", causal=True, Lq=127, Lk=127, D=96),
    Case("hd128_everything", rel_k="per_head", rel_v="shared", rel_bias=True, positions="clip", M=8,
         alibi=True, padding="random", causal=True, H=4, Hk=2, q_offset=3, Lq=129, Lk=200, D=128,
         table_dtype=F32),
    Case("hd256_shaw_index3d", rel_k="shared", rel_v="per_head", positions="index3d", R_index=11, Lq=65,
         Lk=63, D=256),
    # head dim 256 backward: two warps per 16 rows / keys, several query and key tiles, far rows
    Case("hd256_everything_gqa", rel_k="per_head", rel_v="shared", rel_bias=True, positions="clip", M=8,
         alibi=True, padding="random", causal=True, H=4, Hk=2, q_offset=3, Lq=150, Lk=170, D=256),
    Case("hd128_alibi_long", alibi=True, causal=True, B=1, H=2, Lq=257, Lk=257, D=128),
    Case("d16_dv48", rel_v="shared", rel_bias=True, positions="clip", M=5, Lq=63, Lk=65, D=16, Dv=48),
    Case("d80_dv8", rel_k="per_head", positions="t5", Lq=33, Lk=130, D=80, Dv=8),
    Case("d200_dv136", rel_k="shared", rel_v="shared", positions="clip", M=3, B=1, Lq=70, Lk=90, D=200,
         Dv=136),
    Case("d17_odd", rel_k="shared", rel_v="shared", rel_bias=True, positions="clip", M=4, Lq=31, Lk=45, D=17,
         Dv=9),
    Case("single_row_decode", rel_k="shared", rel_v="shared", rel_bias=True, positions="t5", causal=True,
         q_offset=300, B=3, H=4, Hk=1, Lq=1, Lk=301, D=64),
    Case("beyond_M_both_sides", rel_k="per_head", rel_v="per_head", rel_bias=True, positions="clip", M=3,
         B=1, H=2, Lq=300, Lk=300, D=64),
    # R = 301: the per-row tables exceed the shared-memory budget and live in global scratch.
    Case("many_buckets_global_tables", rel_k="shared", rel_v="shared", rel_bias=True, positions="clip", M=150,
         B=1, H=2, Lq=200, Lk=333, D=64),
    Case("many_buckets_index2d", rel_k="shared", rel_v="shared", rel_bias=True, positions="index2d",
         R_index=700, B=1, H=2, Lq=70, Lk=90, D=32),
    # Every pair lies beyond -M: one bucket per row. A key-side table (rel_k, rel_bias) would then have an
    # exactly-zero gradient (a per-row constant leaves softmax unchanged) that float32 can only approximate
    # as rounding noise (~1e-5, the naive float32 formula too), so the case carries rel_v alone; the
    # single-bucket rows of the key-side tables are covered by beyond_M_both_sides.
    Case("q_offset_far_negative", rel_v="shared", positions="clip", M=4, alibi=True, q_offset=-100, Lq=65,
         Lk=65, D=32),
    Case("causal_no_keys_for_many_rows", rel_k="shared", rel_v="shared", positions="clip", M=4, causal=True,
         q_offset=-100, Lq=150, Lk=60, D=64),
]

ALL_CASES = ACCURACY_CASES + CUDA_CASES


def to_device(inp, device):
    """A copy on `device`; tensors that require grad become leaves there (so gradients can be taken)."""
    def mv(t):
        if not isinstance(t, torch.Tensor):
            return t
        return t.detach().to(device).requires_grad_(t.requires_grad)
    return Inputs(mv(inp.q), mv(inp.k), mv(inp.v), {n: mv(t) for n, t in inp.kwargs.items()})


def run(inp):
    return relattn.attention(inp.q, inp.k, inp.v, **inp.kwargs, return_lse=True)


def check_against_reference(inp_cpu, dtype, *, compare_cpu=True):
    """CUDA out/lse within SPEC §6 of the float64 reference; within twice that of the CPU op."""
    inp = to_device(inp_cpu, "cuda")
    out, lse = run(inp)
    torch.cuda.synchronize()
    B, H, Lq = inp.q.shape[:3]
    Dv = inp.v.shape[-1]
    assert out.is_cuda and lse.is_cuda
    assert out.dtype == dtype and out.shape == (B, H, Lq, Dv)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and lse.shape == (B, H, Lq)

    ref_out, ref_lse = reference_attention(inp.q, inp.k, inp.v, **inp.kwargs, dtype=torch.float64)
    naive_out = naive_lse = None
    if dtype in HALF_DTYPES:  # on the CPU, exactly as test_accuracy.py evaluates the SPEC §6 rule
        low = inp_cpu.as_dtype(dtype)
        naive_out, naive_lse = reference_attention(low.q, low.k, low.v, **low.kwargs, dtype=dtype)
    out_c, lse_c, ref_out, ref_lse = out.cpu(), lse.cpu(), ref_out.cpu(), ref_lse.cpu()
    assert_accurate("out", out_c, ref_out, dtype, naive_out)
    assert_accurate("lse", lse_c, ref_lse, dtype, naive_lse)
    if compare_cpu:
        cpu_out, cpu_lse = run(inp_cpu)
        for what, got, cpu, ref, naive in (("out", out_c, cpu_out, ref_out, naive_out),
                                           ("lse", lse_c, cpu_lse, ref_lse, naive_lse)):
            bound = 2 * error_bound(dtype, ref, naive)
            err = max_abs_error(got, cpu)
            assert err <= bound, f"{what}: CUDA vs CPU op differ by {err:.3g} > {bound:.3g}"
    return out, lse


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", ALL_CASES, ids=case_id)
def test_cuda_forward_matches_reference_and_cpu(case, dtype):
    check_against_reference(make_inputs(case, dtype), dtype)


# The other code paths of the binding, on a subset of cases that touch every feature.
PATH_CASES = [c for c in ALL_CASES if c.name in (
    "everything_clip_gqa", "everything_t5_mqa", "structural_index3d_all_tables_gqa", "fully_padded_batch",
    "long_rows_beyond_minus_M_causal", "hd128_everything", "d17_odd", "many_buckets_index2d",
    "causal_no_keys_for_many_rows", "hd256_shaw_index3d")]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", PATH_CASES, ids=case_id)
@pytest.mark.parametrize("env", ["tables=global", "tables=smem", "kernel=simt"])
def test_cuda_forward_other_paths(case, dtype, env, monkeypatch):
    if env == "kernel=simt" and dtype not in HALF_DTYPES:
        pytest.skip("float32/float64 always run the SIMT kernel")
    name, value = env.split("=")
    monkeypatch.setenv({"tables": "RELATTN_CUDA_TABLES", "kernel": "RELATTN_CUDA_KERNEL"}[name], value)
    check_against_reference(make_inputs(case, dtype), dtype, compare_cpu=False)


# Split decode steps (flash-decoding; kernels/cuda/forward.h: plan_key_split): the keys are cut into chunks,
# one CTA each, whose partial rows and lse a second kernel merges. The binding splits calls whose queries fit
# one tile and whose CTAs fill less than a wave; RELATTN_CUDA_SPLITS=N forces N chunks on any call.
SPLIT_DECODE_CASES = [
    Case("decode_split_shaw_kv_bias", rel_k="per_head", rel_v="shared", rel_bias=True, positions="clip", M=64,
         alibi=True, causal=True, B=1, H=4, Hk=1, Lq=1, Lk=4100, q_offset=4099, D=128),
    Case("decode_split_t5_padding", rel_bias=True, positions="t5", t5=(32, 2048, False), padding="last_batch",
         causal=True, B=2, H=2, Lq=3, Lk=3000, q_offset=2997, D=64),
    Case("decode_split_plain", B=1, H=8, Hk=2, Lq=1, Lk=8192, q_offset=8191, causal=True, D=96),
]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", SPLIT_DECODE_CASES, ids=case_id)
def test_cuda_split_decode_steps(case, dtype):
    """Long decode steps of few (batch, head) pairs: split by the binding's own choice."""
    check_against_reference(make_inputs(case, dtype), dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", PATH_CASES, ids=case_id)
def test_cuda_forced_key_splits(case, dtype, monkeypatch):
    """Every feature with its keys forced into 3 chunks (any Lq: every query tile is split alike), including
    chunks that causal masking or padding leave without a key."""
    monkeypatch.setenv("RELATTN_CUDA_SPLITS", "3")
    check_against_reference(make_inputs(case, dtype), dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_cuda_gradients_after_a_split_forward(dtype):
    """The backward takes the merged out and lse of a split forward."""
    check_case_gradients(SPLIT_DECODE_CASES[0].with_(Lk=1500, q_offset=1499, grad_lse=True), dtype)


def test_cuda_splits_switch_is_checked(monkeypatch):
    x = torch.randn(1, 1, 4, 8, device="cuda")
    monkeypatch.setenv("RELATTN_CUDA_SPLITS", "many")
    with pytest.raises(RuntimeError, match="RELATTN_CUDA_SPLITS must be an integer in"):
        relattn.attention(x, x, x)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32), ids=str)
def test_cuda_strided_and_misaligned_inputs(dtype):
    """Views with transposed heads (strided rows) and a one-element offset (no 16-byte loads)."""
    g = torch.Generator().manual_seed(3)
    B, H, L, D = 2, 4, 77, 64
    base = torch.randn(B, L, H, D + 1, generator=g, dtype=torch.float64).to(dtype)
    q = base[..., 1:].transpose(1, 2)  # [B, H, L, D], rows strided by H*(D+1), misaligned start
    k = torch.randn(B, L, H, D, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
    v = torch.randn(B, H, D, L, generator=g, dtype=torch.float64).to(dtype).transpose(2, 3)  # last dim stride L
    kw = dict(rel_k=torch.randn(9, D, generator=g).to(dtype), rel_v=torch.randn(9, D, generator=g).to(dtype),
              rel_bias=torch.randn(H, 9, generator=g).to(dtype), buckets=relattn.clip_buckets(4), causal=True)
    inp = Inputs(q, k, v, kw)
    check_against_reference(inp, dtype)


def test_cuda_fully_masked_rows_are_zero_not_nan():
    g = torch.Generator().manual_seed(4)
    B, H, Lq, Lk, D = 2, 2, 70, 90, 64
    q, k, v = (torch.randn(B, H, n, D, generator=g).to(torch.bfloat16).cuda() for n in (Lq, Lk, Lk))
    mask = torch.zeros(B, Lk, dtype=torch.bool)
    mask[1] = True  # batch 1: every key is padding
    kw = dict(rel_k=torch.randn(9, D).cuda(), rel_v=torch.randn(9, D).cuda(), buckets=relattn.clip_buckets(4).cuda(),
              key_padding_mask=mask.cuda(), causal=True, q_offset=-20)  # rows 0..19 of batch 0 see no key
    out, lse = relattn.attention(q, k, v, **kw, return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))
    assert torch.all(out[0, :, :20] == 0) and torch.all(lse[0, :, :20] == float("-inf"))
    assert torch.isfinite(lse[0, :, 20:]).all()


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
def test_cuda_empty_inputs(dtype):
    def t(*shape):
        return torch.randn(*shape, device="cuda").to(dtype)
    out, lse = relattn.attention(t(0, 2, 5, 32), t(0, 2, 7, 32), t(0, 2, 7, 32), return_lse=True)
    assert out.shape == (0, 2, 5, 32) and lse.shape == (0, 2, 5)
    out, lse = relattn.attention(t(1, 2, 0, 32), t(1, 2, 7, 32), t(1, 2, 7, 32), return_lse=True)
    assert out.shape == (1, 2, 0, 32)
    # No keys at all: out 0, lse -inf.
    out, lse = relattn.attention(t(1, 2, 5, 32), t(1, 2, 0, 32), t(1, 2, 0, 32), return_lse=True)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


def test_cuda_head_dim_limit_is_a_clear_error():
    q = torch.randn(1, 1, 4, 264, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="head dims up to 256"):
        relattn.attention(q, q, q)


def test_cuda_runs_on_the_current_stream():
    """Inputs written on a side stream after a delay: a kernel on any other stream would read zeros."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 4, 100, 64, generator=g).half() for _ in range(3))
    expected, _ = run(Inputs(q, k, v, {}))
    src = [t.cuda() for t in (q, k, v)]
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        dst = [torch.zeros_like(t) for t in src]
        torch.cuda._sleep(100_000_000)
        for d, t in zip(dst, src):
            d.copy_(t)
        out = relattn.attention(*dst).cpu()
    s.synchronize()
    assert (out.float() - expected.float()).abs().max().item() < 2e-2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_second_device():
    q = torch.randn(1, 2, 64, 64, device="cuda:1", dtype=torch.bfloat16)
    out = relattn.attention(q, q, q, causal=True)
    assert out.device == q.device
    ref, _ = reference_attention(q, q, q, causal=True, dtype=torch.float64)
    assert (out.double() - ref).abs().max().item() < 2e-2


# ---- backward ---------------------------------------------------------------------------------------------

def _cuda(t):
    return None if t is None else t.cuda()


def _rule_dtype(dtype, grad):
    """The dtype whose SPEC §6 rule holds `grad`: a float32 table beside float64 inputs is a float32 result."""
    return torch.float32 if dtype == torch.float64 and grad.dtype == torch.float32 else dtype


def check_gradients(inp_cpu, inp, dtype, grad_out, grad_lse, *, compare_cpu=True, lse_only=False):
    """Every CUDA gradient of <out, grad_out> + <lse, grad_lse> within SPEC §6 of the float64 reference, and
    within twice that of the CPU op's. `inp_cpu`: the inputs on the CPU (leaves that require grad); `inp`:
    the same values on the GPU (any layout). `grad_out`, `grad_lse`: CPU tensors. With `lse_only` the op's
    `out` is left out of the graph (autograd hands the backward an undefined grad_out) and grad_out must be
    zero. Returns the CUDA gradients."""
    out, lse = run(inp)
    leaves = inp.leaves()
    if lse_only:
        assert not grad_out.any()
        names = list(leaves)
        got = dict(zip(names, torch.autograd.grad([lse], [leaves[n] for n in names], [grad_lse.cuda().to(lse.dtype)],
                                                  allow_unused=True)))
    else:
        got = gradients(out, lse, leaves, grad_out.cuda(), _cuda(grad_lse))
    torch.cuda.synchronize()

    ref_inp = inp.as_dtype(torch.float64)  # on the GPU: the float64 reference is the slow part on the CPU
    ref = gradients(*run_reference(ref_inp, torch.float64), ref_inp.leaves(), grad_out.cuda(), _cuda(grad_lse))
    naive = dict.fromkeys(ref)
    if dtype in HALF_DTYPES:  # on the CPU, exactly as test_accuracy.py evaluates the SPEC §6 rule
        low = inp_cpu.as_dtype(dtype)
        naive = gradients(*run_reference(low, dtype), low.leaves(), grad_out, grad_lse)
    cpu = gradients(*run_op(inp_cpu), inp_cpu.leaves(), grad_out, grad_lse) if compare_cpu else None

    for name, leaf in leaves.items():
        g = got[name]
        if g is None and lse_only and name == "rel_v":  # rel_v does not reach lse
            g = torch.zeros_like(leaf)
        assert g is not None, f"no gradient for {name}"
        assert g.is_cuda and g.device == leaf.device, f"d{name} is on {g.device}"
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, \
            f"d{name}: {g.dtype} {tuple(g.shape)} for a {leaf.dtype} {tuple(leaf.shape)} input"
        g_c, r_c = g.cpu(), ref[name].cpu()
        assert torch.isfinite(g_c).all(), f"d{name} has non-finite entries"
        assert_accurate(f"d{name}", g_c, r_c, dtype, naive[name])
        if cpu is not None:
            bound = 2 * error_bound(_rule_dtype(dtype, g_c), r_c, naive[name])
            err = max_abs_error(g_c, cpu[name])
            assert err <= bound, f"d{name}: CUDA vs CPU op differ by {err:.3g} > {bound:.3g}"
    return got


def check_case_gradients(case, dtype, *, compare_cpu=True):
    inp_cpu = make_inputs(case, dtype, requires_grad=True)
    grad_out, grad_lse = make_grad_outputs(case, dtype)
    return check_gradients(inp_cpu, to_device(inp_cpu, "cuda"), dtype, grad_out, grad_lse, compare_cpu=compare_cpu)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", ALL_CASES, ids=case_id)
def test_cuda_gradients_match_reference_and_cpu(case, dtype):
    check_case_gradients(case, dtype)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("case", PATH_CASES, ids=case_id)
def test_cuda_gradients_simt_kernel(case, dtype, monkeypatch):
    """RELATTN_CUDA_KERNEL=simt: fp16/bf16 forward and backward through the SIMT kernels."""
    monkeypatch.setenv("RELATTN_CUDA_KERNEL", "simt")
    check_case_gradients(case, dtype, compare_cpu=False)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32), ids=str)
def test_cuda_strided_and_misaligned_inputs_backward(dtype):
    """Gradients of strided, misaligned views (element-wise loads in the backward kernels too)."""
    g = torch.Generator().manual_seed(3)
    B, H, L, D = 2, 4, 77, 64

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    q_base, k_base, v_base = rnd(B, L, H, D + 1), rnd(B, L, H, D), rnd(B, H, D, L)
    tables = dict(rel_k=rnd(9, D) * 0.5, rel_v=rnd(9, D) * 0.5, rel_bias=rnd(H, 9))
    flags = dict(buckets=relattn.clip_buckets(4), causal=True)

    def views(qb, kb, vb):  # q: strided rows, misaligned start; k: heads transposed; v: last dim stride L
        return qb[..., 1:].transpose(1, 2), kb.transpose(1, 2), vb.transpose(2, 3)
    q, k, v = (t.requires_grad_() for t in views(q_base.cuda(), k_base.cuda(), v_base.cuda()))
    assert q.stride(-1) == 1 and v.stride(-1) != 1
    inp = Inputs(q, k, v, {**{n: t.cuda().requires_grad_() for n, t in tables.items()},
                           **{n: _cuda(t) if isinstance(t, torch.Tensor) else t for n, t in flags.items()}})
    qc, kc, vc = (t.contiguous().requires_grad_() for t in views(q_base, k_base, v_base))
    inp_cpu = Inputs(qc, kc, vc, {**{n: t.clone().requires_grad_() for n, t in tables.items()}, **flags})
    grad_out = torch.randn(B, H, L, D, generator=g, dtype=torch.float64).to(dtype)
    grad_lse = torch.randn(B, H, L, generator=g)
    check_gradients(inp_cpu, inp, dtype, grad_out, grad_lse)


# Rows that see no key: the last batch is all padding (and batch 0 has ~30% padding keys); causal with
# q_offset=-20 leaves rows 0..19 of every batch without keys. grad_lse is non-zero on those rows too: the op
# must ignore it (lse is -inf there).
MASKED_ROWS_CASE = Case("cuda_fully_masked_rows", rel_k="shared", rel_v="per_head", rel_bias=True, positions="clip",
                        M=4, alibi=True, padding="last_batch", causal=True, q_offset=-20, H=4, Hk=2, Lq=70, Lk=90,
                        D=64, grad_lse=True, table_dtype=F32)


@pytest.mark.parametrize("kernel,dtype", [("default", d) for d in ALL_DTYPES] + [("simt", d) for d in HALF_DTYPES],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_cuda_fully_masked_rows_backward(kernel, dtype, monkeypatch):
    if kernel == "simt":  # float32/float64 always run the SIMT kernels
        monkeypatch.setenv("RELATTN_CUDA_KERNEL", "simt")
    case = MASKED_ROWS_CASE
    inp_cpu = make_inputs(case, dtype, requires_grad=True)
    inp = to_device(inp_cpu, "cuda")
    grad_out, grad_lse = make_grad_outputs(case, dtype)
    out, lse = run(inp)
    dead = torch.isinf(lse).cpu()  # [B, H, Lq]: rows with no key
    assert dead[-1].all() and dead[:, :, :20].all() and not dead.all(), "the case lost its fully masked rows"
    assert torch.all(out.cpu()[dead] == 0)

    got = check_gradients(inp_cpu, inp, dtype, grad_out, grad_lse, compare_cpu=False)
    for name, g in got.items():
        assert torch.isfinite(g).all(), f"d{name} is not finite"
    dq = got["q"].cpu()
    assert torch.all(dq[dead] == 0), "dq of rows that see no key must be exactly 0"
    padded = inp_cpu.kwargs["key_padding_mask"]  # [B, Lk]: padding keys get no gradient
    for name in ("k", "v"):
        g = got[name].cpu().transpose(1, 2)  # [B, Lk, Hk, D]
        assert torch.all(g[padded] == 0), f"d{name} of padding keys must be exactly 0"


def _deterministic_runs(case, dtype, runs, deterministic):
    inp = to_device(make_inputs(case, dtype, requires_grad=True), "cuda")
    grad_out, grad_lse = (_cuda(t) for t in make_grad_outputs(case, dtype))
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        first = None
        for n in range(runs):
            out, lse = run(inp)
            result = {"out": out.detach(), "lse": lse.detach(),
                      **{f"d{k}": g for k, g in gradients(out, lse, inp.leaves(), grad_out, grad_lse).items()}}
            if first is None:
                first = result
                assert all(torch.isfinite(t[~torch.isinf(t)]).all() for t in first.values())
                continue
            for name, t in result.items():
                assert torch.equal(t, first[name]), f"{name} of run {n} differs from run 0"
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


DETERMINISM_CASE = Case("cuda_determinism", rel_k="shared", rel_v="shared", rel_bias=True, positions="clip", M=16,
                        causal=True, padding="random", B=2, H=8, Hk=2, Lq=300, D=64, grad_lse=True)


@pytest.mark.parametrize("kernel,dtype,deterministic,runs", [
    ("default", torch.bfloat16, True, 50),
    ("default", torch.bfloat16, False, 50),
    ("default", torch.float16, True, 20),
    ("simt", torch.bfloat16, True, 20),
    ("default", torch.float32, True, 20),
], ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, bool) else ("deterministic" if v else "default_mode"))
def test_cuda_backward_is_deterministic(kernel, dtype, deterministic, runs, monkeypatch):
    """Bit-identical out, lse and every gradient over many runs (the shared tables sum over heads, batches
    and query tiles; dk/dv over the 4 heads of each kv head)."""
    if kernel == "simt":
        monkeypatch.setenv("RELATTN_CUDA_KERNEL", "simt")
    _deterministic_runs(DETERMINISM_CASE, dtype, runs, deterministic)


@pytest.mark.parametrize("D", [128, 256])
def test_cuda_backward_race(D):
    """A large bf16 call with every feature (about a thousand CTAs per kernel, several per SM at head dim 128;
    at 256 two warps share each 16 rows): any race or order-dependent reduction between blocks or between
    the warps of a block shows up as a bit difference in 20 repeats."""
    case = Case("cuda_race", rel_k="shared", rel_v="per_head", rel_bias=True, positions="clip", M=64, alibi=True,
                padding="random", causal=True, q_offset=7, B=16 if D == 128 else 8, H=8, Hk=2, Lq=512, D=D,
                grad_lse=True, table_dtype=F32)
    _deterministic_runs(case, torch.bfloat16, 20, True)


LSE_CASES = [c for c in ALL_CASES if c.name in (
    "plain_gqa_multi_tile", "t5_bias_unidirectional_causal", "structural_index2d_causal_negative_offset",
    "fully_padded_batch", "everything_t5_mqa", "hd128_everything", "hd256_shaw_index3d")]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", LSE_CASES, ids=case_id)
def test_cuda_lse_gradient(case, dtype):
    """Gradients through lse alone (out unused: autograd passes no grad_out), against the reference and the
    CPU op. The grid above covers lse and out together."""
    case = case.with_(grad_lse=True)
    inp_cpu = make_inputs(case, dtype, requires_grad=True)
    grad_out, grad_lse = make_grad_outputs(case, dtype)
    check_gradients(inp_cpu, to_device(inp_cpu, "cuda"), dtype, torch.zeros_like(grad_out), grad_lse, lse_only=True)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", EMPTY_CASES, ids=case_id)
def test_cuda_empty_inputs_backward(case, dtype):
    inp = to_device(make_inputs(case, dtype, requires_grad=True), "cuda")
    out, lse = run(inp)
    assert out.is_cuda and out.shape == (case.B, case.H, case.Lq, case.Dv) and out.dtype == dtype
    assert lse.shape == (case.B, case.H, case.Lq) and lse.dtype == torch.float32
    if case.Lk == 0:
        assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    grad_out, grad_lse = (_cuda(t) for t in make_grad_outputs(case, dtype))
    grads = gradients(out, lse, inp.leaves(), grad_out, grad_lse)
    torch.cuda.synchronize()
    for name, leaf in inp.leaves().items():
        g = grads[name]
        assert g is not None and g.shape == leaf.shape and g.dtype == leaf.dtype and g.device == leaf.device, f"d{name}"
        assert torch.equal(g, torch.zeros_like(g)), f"d{name} must be zero: nothing attends to anything"


@pytest.mark.parametrize("dims", [(264, 264), (64, 300), (300, 64)], ids=lambda d: f"D{d[0]}_Dv{d[1]}")
def test_cuda_backward_head_dim_limit_is_a_clear_error(dims):
    D, Dv = dims
    q = torch.randn(1, 2, 8, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 2, 8, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 2, 8, Dv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(RuntimeError, match="head dim"):
        relattn.attention(q, k, v, causal=True).sum().backward()
    # The backward op itself, called directly (as a saved graph from elsewhere would): the same clear error.
    out = torch.zeros(1, 2, 8, Dv, device="cuda", dtype=torch.bfloat16)
    lse = torch.zeros(1, 2, 8, device="cuda")
    with pytest.raises(RuntimeError, match="head dim"):
        torch.ops.relattn.attention_backward(torch.ones_like(out), None, q.detach(), k.detach(), v.detach(), out, lse,
                                             None, None, None, None, None, None, None, True, None, 0)
    torch.cuda.synchronize()  # and the context is still usable
    x = torch.randn(1, 2, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    relattn.attention(x, x, x).sum().backward()
    assert torch.isfinite(x.grad).all()


# ---- index spaces past 2^31 ------------------------------------------------------------------------------

def _free_gib():
    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


def _chunked_reference(q, k, v, *, rel_bias=None, rel_k=None, rel_v=None, bucket_of=None, alibi=None, causal=False,
                       q_offset=0, chunk=1024):
    """float32 reference on the GPU, one block of query rows at a time. Query row i sits at position
    i + q_offset; bucket_of(p0, p1) -> [p1 - p0, Lk] bucket ids of the rows at positions [p0, p1)."""
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D)
    out = torch.empty(B, H, Lq, v.shape[-1], device=q.device, dtype=torch.float32)
    lse = torch.empty(B, H, Lq, device=q.device, dtype=torch.float32)
    j = torch.arange(Lk, device=q.device)
    for b in range(B):
        for h in range(H):
            kh, vh = k[b, h // (H // Hk)].float(), v[b, h // (H // Hk)].float()
            for i0 in range(0, Lq, chunk):
                i1 = min(Lq, i0 + chunk)
                qc = q[b, h, i0:i1].float()
                s = (qc @ kh.T) * scale
                idx = bucket_of(i0 + q_offset, i1 + q_offset) if bucket_of is not None else None
                if rel_k is not None:
                    s += torch.gather((qc @ rel_k.float().T) * scale, 1, idx)
                if rel_bias is not None:
                    s += rel_bias[h].float()[idx]
                d = (j.view(1, -1) - torch.arange(i0 + q_offset, i1 + q_offset, device=q.device).view(-1, 1)).float()
                if alibi is not None:
                    s -= alibi[h].float() * d.abs()
                if causal:
                    s.masked_fill_(d > 0, float("-inf"))
                lse[b, h, i0:i1] = torch.logsumexp(s, dim=-1)
                p = torch.softmax(s, dim=-1)
                o = p @ vh
                if rel_v is not None:
                    psum = torch.zeros(i1 - i0, rel_v.shape[0], device=q.device).scatter_add_(1, idx, p)
                    o += psum @ rel_v.float()
                out[b, h, i0:i1] = o
                del s, p
    return out, lse


def _assert_close_bf16(out, lse, ref_out, ref_lse):
    err = (out.float() - ref_out).abs().max().item()
    assert err <= 2e-2 * ref_out.abs().max().item() + 1e-3, f"out error {err:.3g}"
    lerr = (lse - ref_lse).abs().max().item()
    assert lerr <= 1e-2 * (1 + ref_lse.abs().max().item()), f"lse error {lerr:.3g}"


def test_cuda_pairs_past_2_31_t5_alibi_causal():
    """B·H·Lq·Lk = 2·8·16384² ≈ 4.3e9 pairs."""
    if _free_gib() < 8:
        pytest.skip("needs 8 GiB of free GPU memory")
    torch.manual_seed(0)
    B, H, L, D, M = 2, 8, 16384, 64, 128
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    buckets = relattn.t5_buckets(32, M, True).cuda()
    rel_bias = torch.randn(H, 32, device="cuda")
    alibi = relattn.alibi_slopes(H).cuda()
    out, lse = relattn.attention(q, k, v, rel_bias=rel_bias, buckets=buckets, alibi_slopes=alibi, causal=True,
                                 return_lse=True)
    jj = torch.arange(L, device="cuda")

    def bucket_of(p0, p1):
        d = (jj.view(1, -1) - torch.arange(p0, p1, device="cuda").view(-1, 1)).clamp(-M, M) + M
        return buckets.long()[d]

    # The first rows of heads 0-1 and the last rows of heads 6-7, in both batches.
    for heads, r0, r1 in ((slice(0, 2), 0, 2048), (slice(6, 8), L - 1024, L)):
        ref_out, ref_lse = _chunked_reference(q[:, heads, r0:r1], k[:, heads], v[:, heads], rel_bias=rel_bias[heads],
                                              bucket_of=bucket_of, alibi=alibi[heads], causal=True, q_offset=r0)
        _assert_close_bf16(out[:, heads, r0:r1], lse[:, heads, r0:r1], ref_out, ref_lse)


def test_cuda_rel_index_offsets_past_2_31():
    """A 2-D rel_index of Lq·Lk ≈ 2.2e9 ids (8.7 GB): per-pair offsets need 64 bits."""
    if _free_gib() < 16:
        pytest.skip("needs 16 GiB of free GPU memory")
    torch.manual_seed(1)
    B, H, Lq, Lk, D, R = 1, 2, 33000, 66000, 64, 13
    q = torch.randn(B, H, Lq, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, H, Lk, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    rel_index = torch.randint(0, R, (Lq, Lk), device="cuda", dtype=torch.int32)
    rel_k, rel_v = torch.randn(R, D, device="cuda") * 0.5, torch.randn(R, D, device="cuda") * 0.5
    rel_bias = torch.randn(H, R, device="cuda")
    out, lse = relattn.attention(q, k, v, rel_k=rel_k, rel_v=rel_v, rel_bias=rel_bias, rel_index=rel_index,
                                 return_lse=True)
    rows = slice(Lq - 600, Lq)  # the last rows: offsets i*Lk past 2^31
    ref_out, ref_lse = _chunked_reference(q[:, :, rows], k, v, rel_k=rel_k, rel_v=rel_v, rel_bias=rel_bias,
                                          bucket_of=lambda p0, p1: rel_index[p0:p1].long(), q_offset=Lq - 600,
                                          chunk=300)
    _assert_close_bf16(out[:, :, rows], lse[:, :, rows], ref_out, ref_lse)
    del rel_index


def test_cuda_output_offsets_past_2_31():
    """B·H·Lq·Dv = 16·64·16400·128 > 2^31 output (and query) elements."""
    if _free_gib() < 24:
        pytest.skip("needs 24 GiB of free GPU memory")
    torch.manual_seed(2)
    B, H, Lq, Lk, D = 16, 64, 16400, 48, 128
    q = torch.randn(B, H, Lq, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, 8, Lk, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    alibi = relattn.alibi_slopes(H).cuda()
    out, lse = relattn.attention(q, k, v, alibi_slopes=alibi, return_lse=True)
    for b in (0, B - 1):
        ref_out, ref_lse = _chunked_reference(q[b:b + 1, -4:], k[b:b + 1, -1:], v[b:b + 1, -1:],
                                              alibi=alibi[-4:], chunk=8192)
        _assert_close_bf16(out[b:b + 1, -4:], lse[b:b + 1, -4:], ref_out, ref_lse)
