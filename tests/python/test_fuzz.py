"""Random mixes of every feature at once against the float64 reference (SPEC §1, §2, §6).

The accuracy grid (test_accuracy.py) picks its cases by hand; here a seeded generator draws the shapes
(lengths across several CPU tiles of 64 queries x 128 keys, odd head dims, Dv != D, grouped heads) and
switches every feature on or off independently: distance buckets (clip or T5, any M) or per-pair ids,
rel_k / rel_v shared or per head, rel_bias, ALiBi, key padding (with fully masked rows), causal masks,
q_offset of either sign (an int, or one per batch row), a custom scale, segment ids (sorted or not, one
tensor or a query/key pair) and non-contiguous inputs. Each case compares out, lse and every gradient (through out and lse) with the
reference, with every CPU backward algorithm, and on the GPU where present.
"""
import random

import pytest
import torch

import relattn
from cases import CPU_BACKWARD_ALGORITHMS, set_cpu_backward, assert_accurate, gradients
from reference import reference_attention

HAS_CUDA = torch.cuda.is_available() and relattn.cuda_kernels_built()
NUM_CASES = 60
LEAVES = ("q", "k", "v", "rel_k", "rel_v", "rel_bias")  # the differentiable inputs


def draw_case(seed):
    """A dict of sizes and flags, drawn reproducibly from `seed`."""
    r = random.Random(seed)
    Hk = r.choice([1, 2, 3])
    case = dict(
        seed=seed,
        B=r.randint(1, 3), Hk=Hk, H=Hk * r.choice([1, 2, 3]),
        Lq=r.choice([1, r.randint(2, 70), r.randint(60, 200), r.randint(60, 200)]),
        Lk=r.choice([1, r.randint(2, 140), r.randint(120, 300), r.randint(120, 300)]),
        D=r.choice([1, 5, 8, 16, 33]), positions=r.choice([None, "clip", "t5", "index2d", "index3d"]),
        rel_k=r.choice([None, "shared", "per_head"]), rel_v=r.choice([None, "shared", "per_head"]),
        rel_bias=r.random() < 0.5, alibi=r.random() < 0.3, padding=r.choice([None, "random", "rows"]),
        causal=r.random() < 0.4, q_offset=r.choice([0, 0, r.randint(-30, 40)]),
        scale=r.choice([None, None, 0.3]), segments=r.choice([None, None, "sorted", "unsorted", "pair"]),
        strided=r.random() < 0.4, M=r.randint(0, 20),
    )
    buckets = r.choice([4, 8, 32])  # T5: max_distance must exceed the exact buckets
    case["t5"] = (buckets, r.choice([buckets + 1, 2 * buckets, 160]), r.random() < 0.5)
    case["Dv"] = r.choice([case["D"], r.randint(1, 24)])
    if case["positions"] is None:  # tables need buckets
        case["rel_k"] = case["rel_v"] = None
        case["rel_bias"] = False
    case["batch_offsets"] = r.random() < 0.3  # q_offset as a [B] tensor: q_offset + a shift of its own per row
    return case


def case_id(case):
    flags = [case["positions"] or "nopos", case["rel_k"] and f"k-{case['rel_k']}",
             case["rel_v"] and f"v-{case['rel_v']}", case["rel_bias"] and "bias", case["alibi"] and "alibi",
             case["padding"] and f"pad-{case['padding']}", case["causal"] and "causal",
             case["q_offset"] and f"off{case['q_offset']}", case["segments"] and f"seg-{case['segments']}",
             case["batch_offsets"] and "batchoff", case["strided"] and "strided"]
    shape = f"B{case['B']}H{case['H']}k{case['Hk']}q{case['Lq']}k{case['Lk']}D{case['D']}v{case['Dv']}"
    return f"{case['seed']}-{shape}-" + "-".join(f for f in flags if f)


def make(case, dtype, device):
    """(tensor inputs by name, flags) for relattn.attention; float tensors require grad."""
    g = torch.Generator().manual_seed(case["seed"])
    B, H, Hk, Lq, Lk, D, Dv = (case[n] for n in ("B", "H", "Hk", "Lq", "Lk", "D", "Dv"))

    def randn(*shape, std=1.0):
        if case["strided"] and len(shape) == 4:  # a view whose rows are 3 elements apart (float64 keeps it)
            return (torch.randn(*shape[:-1], shape[-1] + 3, generator=g, dtype=torch.float64) * std)[..., :shape[-1]]
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std

    t = {"q": randn(B, H, Lq, D), "k": randn(B, Hk, Lk, D), "v": randn(B, Hk, Lk, Dv)}
    R = 0
    if case["positions"] == "clip":
        t["buckets"], R = relattn.clip_buckets(case["M"]), 2 * case["M"] + 1
    elif case["positions"] == "t5":
        t["buckets"], R = relattn.t5_buckets(*case["t5"]), case["t5"][0]
    elif case["positions"] in ("index2d", "index3d"):
        R = 1 + case["seed"] % 9
        shape = (Lq, Lk) if case["positions"] == "index2d" else (B, Lq, Lk)
        t["rel_index"] = torch.randint(0, R, shape, generator=g, dtype=torch.int32)
    for name, last in (("rel_k", D), ("rel_v", Dv)):
        if case[name]:
            t[name] = randn(*((R, last) if case[name] == "shared" else (H, R, last)), std=0.5)
    if case["rel_bias"]:
        t["rel_bias"] = randn(H, R)
    if case["alibi"]:
        t["alibi_slopes"] = relattn.alibi_slopes(H).double()
    if case["padding"] == "random":
        t["key_padding_mask"] = torch.rand(B, Lk, generator=g) < 0.3
    elif case["padding"] == "rows":  # the last batch row entirely masked
        mask = torch.rand(B, Lk, generator=g) < 0.2
        mask[-1] = True
        t["key_padding_mask"] = mask
    if case["segments"]:
        # Runs of 1-39 tokens numbered 0, 1, 2, ... along each row.
        lengths = torch.randint(1, 40, (B, Lk), generator=g)
        k_ids = torch.stack([torch.repeat_interleave(torch.arange(Lk), lengths[b])[:Lk] for b in range(B)])
        if case["segments"] == "unsorted":
            k_ids = k_ids[:, torch.randperm(Lk, generator=g)] % 3
        if case["segments"] == "pair":
            t["segment_ids"] = (torch.randint(0, 4, (B, Lq), generator=g), k_ids % 4)
        elif not case["batch_offsets"] and 0 <= case["q_offset"] and Lq + case["q_offset"] <= Lk:
            t["segment_ids"] = k_ids
        else:  # the single form needs every query position among the keys: give the pair
            t["segment_ids"] = (k_ids[:, torch.arange(Lq) % Lk], k_ids)

    def to(name, x):
        if isinstance(x, tuple):
            return tuple(to(name, y) for y in x)
        if name == "alibi_slopes":
            return x.to(device=device, dtype=torch.float32)
        if x.is_floating_point():
            return x.to(device=device, dtype=dtype).requires_grad_(name in LEAVES)
        return x.to(device)

    t = {n: to(n, x) for n, x in t.items()}
    q_offset = case["q_offset"]
    if case["batch_offsets"]:
        q_offset = (q_offset + torch.randint(-20, 30, (B,), generator=g)).to(device)
    flags = dict(causal=case["causal"], q_offset=q_offset, scale=case["scale"])
    return t, flags


def check(case, dtype, device):
    """out, lse and every gradient within SPEC §6's bound of the float64 reference (for half inputs: twice
    the error of the naive formula evaluated in that dtype)."""
    t, flags = make(case, dtype, device)
    kwargs = {n: x for n, x in t.items() if n not in ("q", "k", "v") and x is not None}
    out, lse = relattn.attention(t["q"], t["k"], t["v"], **kwargs, **flags, return_lse=True)

    def copy(name, x, to_dtype):  # a CPU copy in to_dtype, a new leaf
        if isinstance(x, tuple):
            return tuple(copy(name, y, to_dtype) for y in x)
        if x.is_floating_point():
            return x.detach().cpu().to(to_dtype if name != "alibi_slopes" else x.dtype).requires_grad_(name in LEAVES)
        return x.cpu()

    def reference(to_dtype):
        inputs = {n: copy(n, x, to_dtype) for n, x in t.items()}
        kw = {n: x for n, x in inputs.items() if n not in ("q", "k", "v")}
        return inputs, reference_attention(inputs["q"], inputs["k"], inputs["v"], **kw, **flags, dtype=to_dtype)

    ref_t, (ref_out, ref_lse) = reference(torch.float64)
    half = dtype in (torch.float16, torch.bfloat16)
    if half:
        naive_t, (naive_out, naive_lse) = reference(dtype)
    assert_accurate("out", out, ref_out, dtype, naive_out if half else None)
    assert_accurate("lse", lse, ref_lse, dtype, naive_lse if half else None)

    g = torch.Generator().manual_seed(case["seed"] + 1)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grad_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    leaves = {n: t[n] for n in LEAVES if t.get(n) is not None}
    ref_leaves = {n: ref_t[n] for n in leaves}
    got = gradients(out, lse, leaves, grad_out.to(device, out.dtype), grad_lse.to(device, lse.dtype))
    want = gradients(ref_out, ref_lse, ref_leaves, grad_out, grad_lse)
    naive = gradients(naive_out, naive_lse, {n: naive_t[n] for n in leaves}, grad_out, grad_lse) if half else {}
    for name in leaves:
        assert_accurate(f"d{name}", got[name].cpu(), want[name], dtype, naive.get(name))


CASES = [draw_case(seed) for seed in range(NUM_CASES)]


@pytest.mark.parametrize("algorithm", CPU_BACKWARD_ALGORITHMS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_random_mix_float64(case, algorithm, monkeypatch):
    set_cpu_backward(monkeypatch, algorithm)
    check(case, torch.float64, "cpu")


@pytest.mark.parametrize("case", CASES[::4], ids=case_id)
def test_random_mix_float32(case):
    check(case, torch.float32, "cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES[1::4], ids=case_id)
def test_random_mix_half(case, dtype):
    check(case, dtype, "cpu")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and relattn built with its CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cuda_random_mix(case, dtype):
    check(case, dtype, "cuda")
