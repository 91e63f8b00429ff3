"""Deployment: torch.export and AOTInductor keep relattn's op and give eager's results (SPEC §4).

An exported program calls torch.ops.relattn.attention_forward as one node (it is never decomposed), with
the sequence lengths symbolic, so one export serves every length; the exported module also trains
(autograd through the op's registered backward); torch.export.save/load round-trips it; AOTInductor
compiles it into a package whose compiled code calls the op through the dispatcher.
"""
import io

import pytest
import torch

import relattn
from cases import Case, gradients, make_grad_outputs, make_inputs

HAS_CUDA = torch.cuda.is_available() and relattn.cuda_kernels_built()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not HAS_CUDA, reason="needs a GPU and relattn built with its CUDA kernels"))]

# Feature mixes of the accuracy grid (tests/python/test_accuracy.py), small.
CASES = [
    Case("shaw_kv_clip_gqa_padding", rel_k="per_head", rel_v="shared", positions="clip", M=3, H=4, Hk=2,
         padding="random", Lq=11, Lk=13, D=8, grad_lse=True),
    Case("t5_bias_causal_offset", rel_bias=True, positions="t5", t5=(8, 20, True), causal=True, q_offset=2,
         Lq=9, Lk=12, D=8),
    Case("structural_index3d_all_tables", rel_k="shared", rel_v="per_head", rel_bias=True, positions="index3d",
         Lq=10, Lk=7, D=8, Dv=4),
    Case("alibi_mqa", alibi=True, H=4, Hk=1, Lq=9, D=8),
]


class Attention(torch.nn.Module):
    """relattn.attention with a case's flags as constants and its tensors as inputs (None stays None)."""

    NAMES = ("rel_k", "rel_v", "rel_bias", "buckets", "rel_index", "alibi_slopes", "key_padding_mask")

    def __init__(self, flags):
        super().__init__()
        self.flags = flags

    def forward(self, q, k, v, rel_k, rel_v, rel_bias, buckets, rel_index, alibi_slopes, key_padding_mask):
        tensors = dict(zip(self.NAMES, (rel_k, rel_v, rel_bias, buckets, rel_index, alibi_slopes,
                                        key_padding_mask)))
        return relattn.attention(q, k, v, **tensors, **self.flags, return_lse=True)


def _split(inp):
    """(module, positional args, dynamic_shapes) for a case's inputs; the lengths are dynamic."""
    kw = inp.kwargs
    flags = {n: kw[n] for n in ("causal", "q_offset", "scale") if n in kw}
    args = (inp.q, inp.k, inp.v, *(kw.get(n) for n in Attention.NAMES))
    auto = torch.export.Dim.AUTO
    lq, lk = {2: auto}, {2: auto}
    dims = {"q": lq, "k": lk, "v": lk, "rel_index": None, "key_padding_mask": None}
    if kw.get("rel_index") is not None:
        dims["rel_index"] = {kw["rel_index"].dim() - 2: auto, kw["rel_index"].dim() - 1: auto}
    if kw.get("key_padding_mask") is not None:
        dims["key_padding_mask"] = {1: auto}
    dynamic = tuple(dims.get(n) for n in ("q", "k", "v", *Attention.NAMES))
    return Attention(flags), args, dynamic


def _attention_nodes(graph_module):
    return [n for n in graph_module.graph.nodes if n.op == "call_function"
            and "relattn" in str(n.target) and "attention" in str(n.target)]


def _check_matches_eager(fn, case, requires_grad=False, seed=0):
    inp = make_inputs(case, torch.float32, requires_grad=requires_grad, seed=seed)
    module, args, _ = _split(inp)
    out, lse = fn(*args)
    ref_out, ref_lse = module(*args)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    if requires_grad:
        grad_out, grad_lse = make_grad_outputs(case, torch.float32)
        got = gradients(out, lse, inp.leaves(), grad_out, grad_lse)
        want = gradients(ref_out, ref_lse, inp.leaves(), grad_out, grad_lse)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"d{name}: {m}")


def _export(case):
    module, args, dynamic = _split(make_inputs(case, torch.float32))
    return torch.export.export(module, args, dynamic_shapes=dynamic)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_export_matches_eager_at_other_lengths(case):
    ep = _export(case)
    nodes = _attention_nodes(ep.graph_module)
    assert len(nodes) == 1, ep.graph_module.code
    # The lengths are symbols: the one program runs the example shape and others, longer and shorter.
    lq, lk = nodes[0].args[0].meta["val"].shape[2], nodes[0].args[1].meta["val"].shape[2]
    assert isinstance(lq, torch.SymInt) and isinstance(lk, torch.SymInt), (lq, lk)
    for shape in ({}, {"Lq": case.Lq + 20, "Lk": case.Lk + 31}, {"Lq": 3, "Lk": 2}):
        _check_matches_eager(ep.module(), case.with_(**shape), seed=len(shape))


@pytest.mark.parametrize("case", CASES[:2], ids=lambda c: c.name)
def test_exported_module_trains(case):
    # The default export keeps the op whole with its registered autograd: the exported module's gradients
    # (every input, every table) are eager's.
    ep = _export(case)
    _check_matches_eager(ep.module(), case, requires_grad=True)
    _check_matches_eager(ep.module(), case.with_(Lq=case.Lq + 9, Lk=case.Lk + 4), requires_grad=True)


def test_decompositions_keep_the_op():
    # Lowering to the core ATen opset (what backends and AOTInductor consume) leaves the custom op whole.
    ep = _export(CASES[0]).run_decompositions()
    assert len(_attention_nodes(ep.graph_module)) == 1, ep.graph_module.code
    _check_matches_eager(ep.module(), CASES[0].with_(Lq=30, Lk=25))


def test_save_load_roundtrip():
    ep = _export(CASES[2])
    buffer = io.BytesIO()
    torch.export.save(ep, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    assert len(_attention_nodes(loaded.graph_module)) == 1
    _check_matches_eager(loaded.module(), CASES[2].with_(Lq=21, Lk=19))


class DecodeStep(torch.nn.Module):
    """One decode step over a preallocated cache with per-row offsets (the tensor q_offset)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.rel_k = torch.nn.Parameter(torch.randn(9, 8, generator=g))
        self.rel_bias = torch.nn.Parameter(torch.randn(2, 9, generator=g))
        self.register_buffer("buckets", relattn.clip_buckets(4))

    def forward(self, q, k_cache, v_cache, lengths):
        return relattn.attention(q, k_cache, v_cache, rel_k=self.rel_k, rel_bias=self.rel_bias, buckets=self.buckets,
                                 causal=True, q_offset=lengths)


def test_export_decode_step_with_tensor_offsets():
    """The offsets are a graph input: one exported program serves every step and every mix of row lengths."""
    step = DecodeStep()
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(3, 2, L, 8, generator=g) for L in (1, 40, 40))
    ep = torch.export.export(step, (q, k, v, torch.tensor([3, 17, 39], dtype=torch.int32)))
    assert len(_attention_nodes(ep.graph_module)) == 1
    for lengths in ([0, 5, 9], [39, 20, 1], [12, 12, 12]):
        lengths = torch.tensor(lengths, dtype=torch.int32)
        torch.testing.assert_close(ep.module()(q, k, v, lengths), step(q, k, v, lengths), rtol=0, atol=0)


class PackedEncoderBlock(torch.nn.Module):
    """An attention block over packed sequences: projections, relative key embeddings, a T5-style bias
    table over clipped distances, segment ids and padding — the ops around the custom one are compiled
    by Inductor, the custom op is called through the dispatcher."""

    def __init__(self, d_model=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(d_model, 3 * d_model)
        self.out = torch.nn.Linear(d_model, d_model)
        self.rel_k = torch.nn.Parameter(0.3 * torch.randn(9, d_model // heads))
        self.rel_bias = torch.nn.Parameter(torch.randn(heads, 9))
        self.register_buffer("buckets", relattn.clip_buckets(4))

    def forward(self, x, segment_ids, padding):
        B, L, E = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, E // self.heads).permute(2, 0, 3, 1, 4)
        y = relattn.attention(q, k, v, rel_k=self.rel_k, rel_bias=self.rel_bias, buckets=self.buckets,
                              key_padding_mask=padding, segment_ids=segment_ids)
        return x + self.out(y.transpose(1, 2).reshape(B, L, E))


def _packed_inputs(B, L, seed, device):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, 16, generator=g)
    # Sorted ids: runs of about 3 tokens.
    ids = torch.cumsum(torch.rand(B, L, generator=g) < 0.3, dim=1).to(torch.int32)
    padding = torch.rand(B, L, generator=g) < 0.1
    return x.to(device), ids.to(device), padding.to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_aoti_package_matches_eager(tmp_path, device):
    torch.manual_seed(0)
    model = PackedEncoderBlock().eval().to(device)
    example = _packed_inputs(2, 24, seed=0, device=device)
    auto = torch.export.Dim.AUTO
    ep = torch.export.export(model, example, dynamic_shapes=({0: auto, 1: auto}, {0: auto, 1: auto},
                                                             {0: auto, 1: auto}))
    assert len(_attention_nodes(ep.graph_module)) == 1
    package = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "block.pt2"))
    compiled = torch._inductor.aoti_load_package(package)
    for B, L in ((2, 24), (3, 70), (1, 5)):
        inputs = _packed_inputs(B, L, seed=L, device=device)
        with torch.no_grad():
            want = model(*inputs)
        torch.testing.assert_close(compiled(*inputs), want, rtol=1e-4, atol=1e-4)


def test_load_weights_reads_dicts_of_tensors_only(tmp_path):
    # The C++ side (relattn::nn::save_state_dict) is checked by scripts/test.sh: run_exported writes the
    # weights back and export_encoder.py --check-cpp-weights loads them. Here: a plain dict loads, other
    # contents are refused by name.
    from relattn.nn import load_weights
    good = {"a.weight": torch.ones(2, 3), "b": torch.zeros(1)}
    torch.save(good, tmp_path / "good.pt")
    got = load_weights(str(tmp_path / "good.pt"))
    assert got.keys() == good.keys() and all(torch.equal(got[n], good[n]) for n in good)
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="does not hold a dict of tensors by name"):
        load_weights(str(tmp_path / "list.pt"))
