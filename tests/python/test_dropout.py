"""Dropout on the attention weights (kernels/dropout.h), against an independent model of its mask.

The mask is a function of (seed, b, h, i, j) only: `dropout_reference.py` rebuilds it in NumPy from
Philox4x32-10 (checked here against Random123's known answers) and the documented counter layout. The
float64 reference then multiplies its weights by those factors, so forward and every gradient are held to
the accuracy rule of SPEC §6 exactly as without dropout.
"""
import math

import pytest
import torch

import relattn
from cases import (CPU_BACKWARD_ALGORITHMS, set_cpu_backward, HALF_DTYPES, Case, assert_accurate, case_id, check_gradients, gradients, make_grad_outputs,
                   make_inputs)
from dropout_reference import keep_factors, philox4x32_10, threshold
from reference import reference_attention
from test_accuracy import CASES

P = 0.25
SEED = 0x1234_5678_9ABC_DEF  # uses both 32-bit halves of the key


def seed_tensor(seed=SEED, device="cpu"):
    return torch.tensor([seed], dtype=torch.int64, device=device)


def op(inp, p=P, seed=SEED, **extra):
    return relattn.attention(inp.q, inp.k, inp.v, **inp.kwargs, return_lse=True, dropout_p=p,
                             dropout_seed=seed_tensor(seed), **extra)


def ref(inp, dtype, p=P, seed=SEED):
    B, H, Lq, _ = inp.q.shape
    keep = keep_factors(seed, p, B, H, Lq, inp.k.shape[2])
    return reference_attention(inp.q, inp.k, inp.v, **inp.kwargs, dtype=dtype, dropout_keep=keep)


RANDOM123_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", RANDOM123_KAT)
def test_reference_philox_matches_random123(ctr, key, expected):
    assert tuple(int(w) for w in philox4x32_10(ctr, key)) == expected


def mask_of_op(B, H, Lq, Lk, p, seed, dtype=torch.float64, **kwargs):
    """The op's dropout factors, read off its output: with q = 0 every weight is 1/Lk, and v = I makes
    out[b, h, i, j] = factor_ij / Lk."""
    q = torch.zeros(B, H, Lq, 8, dtype=dtype)
    k = torch.randn(B, H, Lk, 8, dtype=dtype)
    v = torch.eye(Lk, dtype=dtype).expand(B, H, Lk, Lk)
    out = relattn.attention(q, k, v, dropout_p=p, dropout_seed=seed_tensor(seed), **kwargs)
    return out.double() * Lk


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
@pytest.mark.parametrize("p", (0.1, 0.5, 0.9))
@pytest.mark.parametrize("seed", (0, 7, SEED, -1))
def test_mask_matches_independent_model(p, seed, dtype):
    """Several query and key tiles (CPU tiles are 64 x 128), odd sizes, B and H > 1, negative seeds; float32
    draws the mask with 8 Philox calls at once (AVX2 where the CPU has it), float64 one at a time. Lk = 150
    ends in a 22-column tile: whole 32-column groups and a tail."""
    B, H, Lq, Lk = 2, 3, 83, 150
    got = mask_of_op(B, H, Lq, Lk, p, seed, dtype)
    want = keep_factors(seed, p, B, H, Lq, Lk)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(got, want, rtol=tol, atol=tol), \
        f"{(got.round(decimals=6) != want.round(decimals=6)).sum().item()} of {want.numel()} factors differ"


def test_mask_ignores_q_offset_and_gqa():
    """The mask is indexed by (b, h, i, j) of the attention matrix: q_offset, causal masking and kv-head
    grouping change which weights exist, not their factors."""
    B, H, Lq, Lk = 1, 4, 40, 70
    want = keep_factors(SEED, P, B, H, Lq, Lk)
    q = torch.zeros(B, H, Lq, 8, dtype=torch.float64)
    k = torch.randn(B, 2, Lk, 8, dtype=torch.float64)
    v = torch.eye(Lk, dtype=torch.float64).expand(B, 2, Lk, Lk)
    out = relattn.attention(q, k, v, causal=True, q_offset=Lk - Lq, dropout_p=P, dropout_seed=seed_tensor())
    visible = torch.arange(Lk).view(1, -1) <= torch.arange(Lq).view(-1, 1) + (Lk - Lq)
    counts = visible.sum(-1, keepdim=True).double()
    assert torch.allclose(out * counts, want * visible, atol=1e-12)


def test_kept_fraction_and_scale():
    """About 1 - p' of the pairs are kept (within 5 sigma) and a kept weight is scaled by exactly 1/(1-p')."""
    p = 0.3
    got = mask_of_op(4, 4, 128, 256, p, 99)
    t = threshold(p)
    scale = 65536.0 / (65536 - t)
    kept = got > 0
    assert torch.allclose(got[kept], torch.full_like(got[kept], scale), rtol=1e-12)
    n = got.numel()
    keep_prob = 1 - t / 65536
    assert abs(kept.sum().item() / n - keep_prob) < 5 * math.sqrt(keep_prob * (1 - keep_prob) / n)


DROPOUT_CASES = [c for c in CASES if c.name in (
    "plain_gqa_multi_tile", "shaw_kv_per_head_clip_dv", "shaw_kv_index3d_gqa", "t5_bias_unidirectional_causal",
    "t5_bias_rel_v_negative_offset", "alibi_padding_mqa", "structural_index2d_causal_negative_offset",
    "everything_clip_gqa", "everything_t5_mqa", "fully_padded_batch", "long_rows_beyond_plus_M",
    "long_rows_beyond_minus_M_causal", "single_key")]


def test_dropout_cases_exist():
    assert len(DROPOUT_CASES) == 13


def _naive(inp, dtype, fn):
    return fn(inp.as_dtype(dtype), dtype) if dtype in HALF_DTYPES else (None, None)


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("case", DROPOUT_CASES, ids=case_id)
def test_forward_with_dropout_matches_reference(case, dtype):
    inp = make_inputs(case, dtype)
    out, lse = op(inp)
    ref_out, ref_lse = ref(inp, torch.float64)
    naive_out, naive_lse = _naive(inp, dtype, ref)
    assert_accurate("out", out, ref_out, dtype, naive_out)
    assert_accurate("lse", lse, ref_lse, dtype, naive_lse)


@pytest.mark.parametrize("algorithm", CPU_BACKWARD_ALGORITHMS)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", DROPOUT_CASES, ids=case_id)
def test_gradients_with_dropout_match_reference(case, dtype, algorithm, monkeypatch):
    """Every CPU backward algorithm (tests/python/cases.py, set_cpu_backward)."""
    set_cpu_backward(monkeypatch, algorithm)
    check_gradients(case, dtype, op, ref)


def test_gradcheck_with_dropout():
    case = Case("dropout_gradcheck", B=2, H=2, Hk=1, Lq=19, Lk=23, D=8, Dv=6, rel_k="per_head", rel_v="shared",
                rel_bias=True, positions="clip", M=3, alibi=True, padding="random", causal=True, q_offset=4)
    inp = make_inputs(case, torch.float64, requires_grad=True)
    names = list(inp.leaves())
    kwargs = {n: t for n, t in inp.kwargs.items() if n not in names}

    def fn(*leaves):
        named = dict(zip(names, leaves))
        out, lse = relattn.attention(named["q"], named["k"], named["v"], **kwargs,
                                     **{n: named[n] for n in names[3:]}, return_lse=True, dropout_p=0.4,
                                     dropout_seed=seed_tensor())
        return out, lse.masked_fill(torch.isinf(lse), 0.0)

    assert torch.autograd.gradcheck(fn, tuple(inp.leaves().values()), atol=1e-8, rtol=1e-6)


def test_p_zero_and_tiny_p_are_exactly_no_dropout():
    inp = make_inputs(DROPOUT_CASES[7], torch.float32)
    plain = relattn.attention(inp.q, inp.k, inp.v, **inp.kwargs)
    assert torch.equal(op(inp, p=0.0)[0], plain)
    assert torch.equal(op(inp, p=2.0 ** -18)[0], plain)  # rounds to 0/65536
    assert torch.equal(relattn.attention(inp.q, inp.k, inp.v, **inp.kwargs, dropout_p=0.0), plain)


def test_lse_is_unchanged_by_dropout():
    inp = make_inputs(DROPOUT_CASES[7], torch.float32)
    _, lse = relattn.attention(inp.q, inp.k, inp.v, **inp.kwargs, return_lse=True)
    assert torch.equal(op(inp)[1], lse)


@pytest.mark.parametrize("algorithm", CPU_BACKWARD_ALGORITHMS)
def test_p_one_drops_everything(algorithm, monkeypatch):
    set_cpu_backward(monkeypatch, algorithm)
    inp = make_inputs(DROPOUT_CASES[7], torch.float64, requires_grad=True)
    out, lse = op(inp, p=1.0)
    assert torch.equal(out, torch.zeros_like(out))
    grads = gradients(out, lse, inp.leaves(), torch.randn_like(out), None)
    for name, g in grads.items():
        assert torch.equal(g, torch.zeros_like(g)), f"d{name} is not zero with every weight dropped"


def test_same_seed_same_result_new_seed_new_mask():
    inp = make_inputs(DROPOUT_CASES[1], torch.float32, requires_grad=True)
    a = op(inp)[0]
    b = op(inp)[0]
    c = op(inp, seed=SEED + 1)[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_draws_its_seed_from_torch_generator():
    inp = make_inputs(DROPOUT_CASES[1], torch.float32)
    torch.manual_seed(3)
    a = relattn.attention(inp.q, inp.k, inp.v, **inp.kwargs, dropout_p=P)
    b = relattn.attention(inp.q, inp.k, inp.v, **inp.kwargs, dropout_p=P)
    torch.manual_seed(3)
    c = relattn.attention(inp.q, inp.k, inp.v, **inp.kwargs, dropout_p=P)
    assert torch.equal(a, c)
    assert not torch.equal(a, b)
    seed = relattn.draw_dropout_seed(inp.q)
    assert seed.dtype == torch.int64 and seed.shape == (1,) and 0 <= seed.item() < 2 ** 62


def test_backward_is_deterministic_with_dropout():
    inp = make_inputs(DROPOUT_CASES[7], torch.float32, requires_grad=True)
    grad_out, _ = make_grad_outputs(DROPOUT_CASES[7], torch.float32)
    first = gradients(*op(inp), inp.leaves(), grad_out, None)
    for _ in range(3):
        again = gradients(*op(inp), inp.leaves(), grad_out, None)
        assert all(torch.equal(first[n], again[n]) for n in first)


@pytest.mark.parametrize("p", (-0.1, 1.5, float("nan"), float("inf")))
def test_bad_dropout_p(p):
    inp = make_inputs(DROPOUT_CASES[0], torch.float32)
    with pytest.raises(RuntimeError, match="dropout_p must be in \\[0, 1\\]"):
        op(inp, p=p)


def test_bad_dropout_seed():
    inp = make_inputs(DROPOUT_CASES[0], torch.float32)
    args = inp.op_args()
    with pytest.raises(RuntimeError, match="needs dropout_seed"):
        torch.ops.relattn.attention_forward(*args, 0.5, None)
    for seed, what in ((torch.tensor([1.0]), "Float"), (torch.tensor([1, 2]), "shape \\[2\\]"),
                       (torch.tensor([1], dtype=torch.int32), "Int")):
        with pytest.raises(RuntimeError, match=f"dropout_seed must be an int64 tensor of one element, got .*{what}"):
            torch.ops.relattn.attention_forward(*args, 0.5, seed)
    seed = torch.tensor([1])
    with pytest.raises(RuntimeError, match="needs dropout_seed"):
        torch.ops.relattn.attention_backward(torch.ones(2, 4, 97, 64), None, *args[:3], torch.ones(2, 4, 97, 64),
                                             torch.zeros(2, 4, 97), *args[3:], 0.5, None)
    out, lse = torch.ops.relattn.attention_forward(*args, 0.5, seed)
    assert out.shape == (2, 4, 97, 64)


def test_opcheck_with_dropout():
    inp = make_inputs(DROPOUT_CASES[7], torch.float32, requires_grad=True)
    args = (*inp.op_args(), P, seed_tensor())
    torch.library.opcheck(torch.ops.relattn.attention_forward.default, args)
    out, lse = torch.ops.relattn.attention_forward(*args)
    grad_out = torch.randn_like(out)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(torch.ops.relattn.attention_backward.default,
                          (grad_out, None, *detached[:3], out.detach(), lse.detach(), *detached[3:]))


def test_compile_fullgraph_with_dropout():
    inp = make_inputs(DROPOUT_CASES[1], torch.float32, requires_grad=True)
    seed = seed_tensor()

    def fn(q, k, v, seed):
        return relattn.attention(q, k, v, **inp.kwargs, dropout_p=P, dropout_seed=seed)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = compiled(inp.q, inp.k, inp.v, seed)
    want = fn(inp.q, inp.k, inp.v, seed)
    assert torch.equal(got, want)
    got.sum().backward()
    assert inp.q.grad is not None and torch.isfinite(inp.q.grad).all()

    # A seed drawn inside the compiled graph.
    drawn = torch.compile(lambda q, k, v: relattn.attention(q, k, v, **inp.kwargs, dropout_p=P),
                          fullgraph=True, backend="aot_eager")
    out = drawn(inp.q.detach(), inp.k.detach(), inp.v.detach())
    assert out.shape == want.shape and torch.isfinite(out).all()


def test_autocast_with_dropout():
    inp = make_inputs(DROPOUT_CASES[7], torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = op(inp)[0]
    assert out.dtype == torch.bfloat16
    # Autocast casts q, k and v; float32 tables stay float32 (the mixed-precision case).
    half = type(inp)(*(t.to(torch.bfloat16) for t in (inp.q, inp.k, inp.v)), inp.kwargs)
    assert torch.equal(out, op(half)[0])


needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and relattn.cuda_kernels_built()),
                                reason="needs a CUDA device and relattn's CUDA kernels")


def _to(inp, device):
    move = lambda t: t.detach().to(device).requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
    return type(inp)(move(inp.q), move(inp.k), move(inp.v), {n: move(t) for n, t in inp.kwargs.items()})


@needs_cuda
@pytest.mark.parametrize("p", (0.1, 0.9))
def test_cuda_dropout_mask_matches_independent_model(p):
    B, H, Lq, Lk = 2, 3, 83, 150
    q = torch.zeros(B, H, Lq, 8, dtype=torch.float64, device="cuda")
    k = torch.randn(B, H, Lk, 8, dtype=torch.float64, device="cuda")
    v = torch.eye(Lk, dtype=torch.float64, device="cuda").expand(B, H, Lk, Lk)
    out = relattn.attention(q, k, v, dropout_p=p, dropout_seed=seed_tensor(device="cuda"))
    assert torch.allclose((out * Lk).cpu(), keep_factors(SEED, p, B, H, Lq, Lk), atol=1e-12)


@needs_cuda
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("case", DROPOUT_CASES, ids=case_id)
def test_cuda_dropout_matches_reference_and_cpu(case, dtype):
    """CUDA draws the CPU's mask for the same seed: forward and every gradient against the float64 reference
    (SPEC §6's rule) and against the CPU op."""
    inp = make_inputs(case, dtype, requires_grad=True)
    dev = _to(inp, "cuda")
    grad_out, grad_lse = make_grad_outputs(case, dtype)
    out, lse = relattn.attention(dev.q, dev.k, dev.v, **dev.kwargs, return_lse=True, dropout_p=P,
                                 dropout_seed=seed_tensor(device="cuda"))
    ref_inp = inp.as_dtype(torch.float64)
    ref_out, ref_lse = ref(ref_inp, torch.float64)
    naive_out, naive_lse = _naive(inp, dtype, ref)
    assert_accurate("out", out.cpu(), ref_out, dtype, naive_out)
    assert_accurate("lse", lse.cpu(), ref_lse, dtype, naive_lse)
    cpu_out, cpu_lse = op(inp)
    assert_accurate("out vs CPU", out.cpu(), cpu_out.double(), dtype, naive_out)

    got = gradients(out, lse, dev.leaves(), grad_out.cuda(), None if grad_lse is None else grad_lse.cuda())
    want = gradients(*ref(ref_inp, torch.float64), ref_inp.leaves(), grad_out, grad_lse)
    naive = {name: None for name in want}
    if dtype in HALF_DTYPES:
        naive_inp = inp.as_dtype(dtype)
        naive = gradients(*ref(naive_inp, dtype), naive_inp.leaves(), grad_out, grad_lse)
    for name in want:
        assert_accurate(f"d{name}", got[name].cpu(), want[name], dtype, naive[name])


@needs_cuda
def test_cuda_dropout_seed_on_another_device_is_an_error():
    q = torch.randn(1, 2, 16, 32, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="dropout_seed is on cpu"):
        relattn.attention(q, q, q, dropout_p=0.1, dropout_seed=seed_tensor())
    out = relattn.attention(q, q, q, dropout_p=0.1)  # draws its seed on q's device
    assert out.shape == q.shape and torch.isfinite(out).all()
