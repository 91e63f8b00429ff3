"""Test inputs built from a readable case description, and the accuracy rule of SPEC §6.

A `Case` names the features it switches on; `make_inputs(case, dtype)` turns it into tensors (seeded, so
every run sees the same numbers). Inputs are drawn in float64 and rounded to `dtype` once, so the op and
the float64 reference see exactly the same values.
"""
from dataclasses import dataclass, replace
from typing import Optional

import torch

import relattn
from reference import reference_attention

HALF_DTYPES = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
DIFFERENTIABLE = ("q", "k", "v", "rel_k", "rel_v", "rel_bias")


@dataclass(frozen=True)
class Case:
    name: str
    B: int = 2
    H: int = 4
    Hk: Optional[int] = None  # default: H (no grouping)
    Lq: int = 17
    Lk: Optional[int] = None  # default: Lq
    D: int = 16
    Dv: Optional[int] = None  # default: D
    rel_k: Optional[str] = None  # None, "shared" ([R, D]) or "per_head" ([H, R, D])
    rel_v: Optional[str] = None  # None, "shared" or "per_head"
    rel_bias: bool = False
    positions: Optional[str] = None  # None, "clip", "t5", "index2d" or "index3d" (rel_index)
    M: int = 8  # clip: max distance (R = 2M+1)
    t5: tuple = (32, 128, True)  # t5: (num_buckets, max_distance, bidirectional)
    R_index: int = 7  # index2d / index3d: number of buckets
    alibi: bool = False
    padding: Optional[str] = None  # None, "random" (~30% of keys) or "last_batch" (all keys of the last batch)
    causal: bool = False
    q_offset: int = 0
    scale: Optional[float] = None
    table_dtype: Optional[torch.dtype] = None  # None: q's dtype; float32: mixed-precision tables
    grad_lse: bool = False  # backpropagate through lse as well as out

    def __post_init__(self):
        # Fill the "same as" defaults so that every field reads as a number.
        for name, default in (("Hk", self.H), ("Lk", self.Lq), ("Dv", self.D)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)

    @property
    def R(self):
        return {"clip": 2 * self.M + 1, "t5": self.t5[0], "index2d": self.R_index,
                "index3d": self.R_index}.get(self.positions, 0)

    def with_(self, **changes):
        """A copy with some fields changed (Hk, Lk and Dv were resolved at construction: change them too)."""
        return replace(self, **changes)


def case_id(case):
    return case.name


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kwargs: dict  # the keyword arguments of relattn.attention (tables, buckets, masks, flags)

    def leaves(self):
        """The differentiable inputs that are present, by name (q, k, v, then the tables)."""
        named = {"q": self.q, "k": self.k, "v": self.v, **self.kwargs}
        return {n: named[n] for n in DIFFERENTIABLE if named.get(n) is not None}

    def as_dtype(self, dtype):
        """A detached copy whose floating tensors are cast to dtype (the naive reference's inputs)."""
        def cast(t):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                return t.detach().to(dtype).requires_grad_(t.requires_grad)
            return t
        return Inputs(cast(self.q), cast(self.k), cast(self.v), {n: cast(t) for n, t in self.kwargs.items()})

    def op_args(self):
        """The positional arguments of torch.ops.relattn.attention_forward, in schema order."""
        kw = self.kwargs
        tensors = [kw.get(n) for n in ("rel_k", "rel_v", "rel_bias", "buckets", "rel_index", "alibi_slopes",
                                       "key_padding_mask")]
        return (self.q, self.k, self.v, *tensors, kw.get("causal", False), kw.get("scale"),
                kw.get("q_offset", 0))


def make_inputs(case, dtype, *, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, dt=dtype, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dt).requires_grad_(requires_grad)

    table_dtype = case.table_dtype or dtype
    q = randn(case.B, case.H, case.Lq, case.D)
    k = randn(case.B, case.Hk, case.Lk, case.D)
    v = randn(case.B, case.Hk, case.Lk, case.Dv)
    kw = {}
    R = case.R
    if case.positions == "clip":
        kw["buckets"] = relattn.clip_buckets(case.M)
    elif case.positions == "t5":
        kw["buckets"] = relattn.t5_buckets(*case.t5)
    elif case.positions == "index2d":
        kw["rel_index"] = torch.randint(0, R, (case.Lq, case.Lk), generator=g)
    elif case.positions == "index3d":
        kw["rel_index"] = torch.randint(0, R, (case.B, case.Lq, case.Lk), generator=g, dtype=torch.int32)
    for name, last in (("rel_k", case.D), ("rel_v", case.Dv)):
        kind = getattr(case, name)
        if kind is not None:
            shape = (R, last) if kind == "shared" else (case.H, R, last)
            kw[name] = randn(*shape, dt=table_dtype, std=0.5)
    if case.rel_bias:
        kw["rel_bias"] = randn(case.H, R, dt=table_dtype)
    if case.alibi:
        kw["alibi_slopes"] = relattn.alibi_slopes(case.H).to(table_dtype)
    if case.padding == "random":
        kw["key_padding_mask"] = torch.rand(case.B, case.Lk, generator=g) < 0.3
    elif case.padding == "last_batch":
        mask = torch.rand(case.B, case.Lk, generator=g) < 0.3
        mask[-1] = True
        kw["key_padding_mask"] = mask
    if case.causal:
        kw["causal"] = True
    if case.q_offset:
        kw["q_offset"] = case.q_offset
    if case.scale is not None:
        kw["scale"] = case.scale
    return Inputs(q, k, v, kw)


def make_grad_outputs(case, dtype, seed=1):
    """Seeded (grad_out, grad_lse); grad_lse is None unless the case backpropagates through lse."""
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(case.B, case.H, case.Lq, case.Dv, generator=g, dtype=torch.float64).to(dtype)
    grad_lse = None
    if case.grad_lse:
        lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        grad_lse = torch.randn(case.B, case.H, case.Lq, generator=g, dtype=torch.float64).to(lse_dtype)
    return grad_out, grad_lse


def run_op(inp):
    return relattn.attention(inp.q, inp.k, inp.v, **inp.kwargs, return_lse=True)


def run_reference(inp, dtype):
    return reference_attention(inp.q, inp.k, inp.v, **inp.kwargs, dtype=dtype)


def gradients(out, lse, leaves, grad_out, grad_lse):
    """{name: gradient} of <out, grad_out> + <lse, grad_lse> with respect to each leaf."""
    outputs, grads = [out], [grad_out.to(out.dtype)]
    if grad_lse is not None:
        # -inf rows (fully masked) have no gradient to give; keep their grad_lse, the op must ignore it.
        outputs.append(lse)
        grads.append(grad_lse.to(lse.dtype))
    names = list(leaves)
    got = torch.autograd.grad(outputs, [leaves[n] for n in names], grads, allow_unused=True)
    return dict(zip(names, got))


def check_forward(case, dtype, op=run_op, reference=run_reference):
    """out and lse of `op(inputs)` within SPEC §6 of `reference(inputs, dtype)` evaluated in float64 (out's
    half-precision rule from the same reference evaluated in `dtype`; lse held to float32's rule)."""
    inp = make_inputs(case, dtype)
    out, lse = op(inp)
    ref_out, ref_lse = reference(inp.as_dtype(torch.float64), torch.float64)
    naive = reference(inp.as_dtype(dtype), dtype)[0] if dtype in HALF_DTYPES else None
    assert_accurate("out", out, ref_out, dtype, naive)
    assert_accurate("lse", lse, ref_lse, torch.float64 if dtype == torch.float64 else torch.float32)


def check_gradients(case, dtype, op=run_op, reference=run_reference):
    """Every gradient of `op(inputs)` (-> out, lse) on the case's inputs is within SPEC §6's bound of
    `reference(inputs, dtype)` evaluated in float64 (the naive rule's half-precision error from the same
    reference evaluated in `dtype`)."""
    inp = make_inputs(case, dtype, requires_grad=True)
    grad_out, grad_lse = make_grad_outputs(case, dtype)
    got = gradients(*op(inp), inp.leaves(), grad_out, grad_lse)

    ref_inp = inp.as_dtype(torch.float64)
    ref = gradients(*reference(ref_inp, torch.float64), ref_inp.leaves(), grad_out, grad_lse)
    naive = {name: None for name in ref}
    if dtype in HALF_DTYPES:
        naive_inp = inp.as_dtype(dtype)
        naive = gradients(*reference(naive_inp, dtype), naive_inp.leaves(), grad_out, grad_lse)

    for name, leaf in inp.leaves().items():
        assert got[name] is not None, f"no gradient for {name}"
        assert got[name].dtype == leaf.dtype and got[name].shape == leaf.shape, name
        assert_accurate(f"d{name}", got[name], ref[name], dtype, naive[name])


# --------------------------------------------------------------------------------------------------
# The accuracy rule of SPEC §6
# --------------------------------------------------------------------------------------------------

def max_abs_error(got, ref):
    """max |got - ref| over finite reference entries; -inf entries (masked rows) must match exactly."""
    got64, ref64 = got.detach().double(), ref.detach().double()
    assert got64.shape == ref64.shape, f"shape {tuple(got64.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(got64).any(), "NaN in the result"
    finite = torch.isfinite(ref64)
    assert torch.equal(torch.isinf(got64), ~finite), "infinite entries differ from the reference's"
    if not finite.any():
        return 0.0
    return (got64[finite] - ref64[finite]).abs().max().item()


def max_abs(t):
    t = t.detach().double()
    t = t[torch.isfinite(t)]
    return t.abs().max().item() if t.numel() else 0.0


def error_bound(dtype, ref, naive=None):
    """The largest error SPEC §6 allows for a result of inputs in `dtype` against the float64 `ref`.

    float16/bfloat16: 2x the error of the naive formula evaluated in that dtype (`naive`), plus
    1e-3*max|ref| slack; float32: 1e-5*(1+max|ref|). float64 is held to gradcheck by the SPEC; here it
    gets a bound tight enough to catch any real slip (1e-10 relative).
    """
    big = max_abs(ref)
    if dtype == torch.float64:
        return 1e-10 * (1 + big)
    if dtype == torch.float32:
        return 1e-5 * (1 + big)
    return 2 * max_abs_error(naive, ref) + 1e-3 * big


def assert_accurate(what, got, ref, dtype, naive=None):
    """`got` (inputs of `dtype`) is within SPEC §6's bound of the float64 `ref`; `naive` is the naive formula
    in `dtype` (half precision only). A float32 result of float64 inputs (the gradient of a float32
    table) is held to the float32 rule: it was rounded to float32."""
    if dtype == torch.float64 and got.dtype == torch.float32:
        dtype = torch.float32
    err = max_abs_error(got, ref)
    bound = error_bound(dtype, ref, naive)
    detail = f" (naive {dtype} error {max_abs_error(naive, ref):.3g})" if naive is not None else ""
    assert err <= bound, f"{what}: max abs error {err:.3g} > allowed {bound:.3g}{detail}, max|ref| {max_abs(ref):.3g}"


def capture(step, after_warmup=None):
    """step() captured into a CUDA graph after two warm-up calls on a side stream (as torch.cuda.graph's
    documentation asks; after_warmup() runs between them and the capture, e.g. to rewind state the warm-up
    advanced); returns the graph and the captured call's outputs (refilled by every replay)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    if after_warmup is not None:
        after_warmup()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


CPU_BACKWARD_ALGORITHMS = ("fused", "fused-chunks", "two-pass")


def set_cpu_backward(monkeypatch, algorithm):
    """Forces the CPU backward's algorithm (csrc/cpu/attention_kernel.cpp, cpu_backward_plan): "fused" (one
    task per batch row and kv head), "fused-chunks" (the strip sweep with each kv group's query blocks split
    into 3 tasks, partial dk and dv added after), "two-pass" or "auto"."""
    monkeypatch.setenv("RELATTN_CPU_BACKWARD", algorithm.removesuffix("-chunks"))
    if algorithm.endswith("-chunks"):
        monkeypatch.setenv("RELATTN_CPU_BACKWARD_CHUNKS", "3")
    else:
        monkeypatch.delenv("RELATTN_CPU_BACKWARD_CHUNKS", raising=False)
