"""Segment ids (packed sequences): a query sees only the keys of its own segment.

Held to the float64 reference with the pair mask of the ids (forward and every gradient, SPEC §6), and to
the property packing exists for: a packed batch gives, sequence by sequence, what each sequence gives alone.
The kernels skip the tiles between the segments of sorted ids, so the cases put segment boundaries on,
beside and between the CPU tiles (64 query rows, 128 keys) and also use unsorted ids (no skipping).
"""
import pytest
import torch

import relattn
from cases import (CPU_BACKWARD_ALGORITHMS, set_cpu_backward, ALL_DTYPES, Case, assert_accurate, case_id, check_gradients, make_grad_outputs, make_inputs,
                   run_reference)
from reference import reference_attention


def packed_ids(lengths_per_row, L, fill=-1, dtype=torch.int64):
    """[B, L] ids: row b holds segments 0, 1, ... of the given lengths, then `fill` up to L."""
    ids = torch.full((len(lengths_per_row), L), fill, dtype=dtype)
    for b, lengths in enumerate(lengths_per_row):
        o = 0
        for s, n in enumerate(lengths):
            ids[b, o:o + n] = s
            o += n
    return ids


def segments_for(case, kind, seed=0):
    """The segment_ids argument of a case: "packed" (sorted, boundaries around the tiles), "unsorted" (a few
    ids in random order), "pair" (q and k ids of their own, sorted, Lq != Lk allowed), "pair_unmatched"
    (some query ids appear among no keys: those rows are fully masked)."""
    g = torch.Generator().manual_seed(seed)
    B, Lq, Lk = case.B, case.Lq, case.Lk
    if kind == "packed":
        rows = []
        for b in range(B):
            lengths, left = [], Lk
            while left > 0:
                n = min(left, int(torch.randint(1, max(2, Lk // 2), (1,), generator=g)))
                lengths.append(n)
                left -= n
            rows.append(lengths)
        return packed_ids(rows, Lk)
    if kind == "unsorted":
        return torch.randint(0, 3, (B, Lk), generator=g, dtype=torch.int32)
    if kind in ("pair", "pair_unmatched"):
        top = 5 if kind == "pair_unmatched" else 3
        q_ids = torch.randint(0, top, (B, Lq), generator=g).sort(dim=1).values
        k_ids = torch.randint(0, 3, (B, Lk), generator=g).sort(dim=1).values
        return q_ids, k_ids
    raise ValueError(kind)


def with_segments(segment_ids):
    def op(inp):
        return relattn.attention(inp.q, inp.k, inp.v, **inp.kwargs, return_lse=True, segment_ids=segment_ids)

    def ref(inp, dtype):
        return reference_attention(inp.q, inp.k, inp.v, **inp.kwargs, dtype=dtype, segment_ids=segment_ids)

    return op, ref


CASES = [
    (Case("shaw_kv_clip", rel_k="per_head", rel_v="shared", positions="clip", M=6, B=2, H=2, Lq=150, D=16),
     "packed"),
    (Case("t5_bias_causal_gqa", rel_bias=True, positions="t5", t5=(16, 64, True), causal=True, B=2, H=4, Hk=2,
          Lq=200, D=16), "packed"),
    (Case("all_terms_padding", rel_k="shared", rel_v="per_head", rel_bias=True, positions="clip", M=4, alibi=True,
          padding="random", B=2, H=2, Lq=70, D=8, Dv=12), "unsorted"),
    (Case("index3d_offset_pair", rel_k="per_head", rel_bias=True, positions="index3d", R_index=5, q_offset=4,
          B=2, H=2, Lq=66, Lk=140, D=8), "pair"),
    (Case("plain_causal_unmatched", causal=True, q_offset=9, B=2, H=2, Lq=40, Lk=50, D=8), "pair_unmatched"),
]


def _id(param):
    return case_id(param) if isinstance(param, Case) else str(param)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case,kind", CASES, ids=_id)
def test_forward_matches_reference(case, kind, dtype):
    op, ref = with_segments(segments_for(case, kind))
    inp = make_inputs(case, dtype)
    out, lse = op(inp)
    ref_out, ref_lse = ref(inp.as_dtype(torch.float64), torch.float64)
    naive = ref(inp.as_dtype(dtype), dtype)[0] if dtype in (torch.float16, torch.bfloat16) else None
    assert_accurate("out", out, ref_out, dtype, naive)
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert_accurate("lse", lse, ref_lse, lse_dtype)
    if kind == "pair_unmatched":
        assert torch.isinf(ref_lse).any(), "the case must have fully masked rows"


@pytest.mark.parametrize("algorithm", CPU_BACKWARD_ALGORITHMS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case,kind", CASES, ids=_id)
def test_gradients_match_reference(case, kind, dtype, algorithm, monkeypatch):
    set_cpu_backward(monkeypatch, algorithm)
    op, ref = with_segments(segments_for(case, kind))
    check_gradients(case.with_(grad_lse=True), dtype, op, ref)


@pytest.mark.parametrize("kind", ["packed", "unsorted", "pair_unmatched"])
def test_gradcheck(kind):
    case = Case("gc", rel_k="per_head", rel_v="shared", rel_bias=True, positions="clip", M=3, causal=kind == "packed",
                B=2, H=2, Lq=9, Lk=11 if kind == "pair_unmatched" else 9, D=4)
    segment_ids = segments_for(case, kind, seed=3)
    inp = make_inputs(case, torch.float64, requires_grad=True)
    leaves = inp.leaves()
    names = list(leaves)

    def f(*xs):
        kw = dict(inp.kwargs)
        named = dict(zip(names, xs))
        kw.update({n: named[n] for n in names if n not in ("q", "k", "v")})
        return relattn.attention(named["q"], named["k"], named["v"], **kw, segment_ids=segment_ids)

    assert torch.autograd.gradcheck(f, [leaves[n] for n in names])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [[[1, 63, 64, 65, 70], [128, 129, 6]], [[263]], [[200, 63], [10] * 26 + [3]]],
                         ids=["around_tiles", "one_sequence", "many_short"])
def test_packed_equals_each_sequence_alone(lengths, causal):
    """Packing several sequences into one row changes nothing for each of them: same out, same lse and the
    same gradients as the sequences attended one by one (relative positions are within a sequence)."""
    L = 263
    B, H, D = len(lengths), 2, 8
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rel_k = torch.randn(H, 9, D, generator=g, dtype=torch.float64, requires_grad=True)
    rel_v = torch.randn(9, D, generator=g, dtype=torch.float64, requires_grad=True)
    rel_bias = torch.randn(H, 9, generator=g, dtype=torch.float64, requires_grad=True)
    tables = dict(rel_k=rel_k, rel_v=rel_v, rel_bias=rel_bias, buckets=relattn.clip_buckets(4),
                  alibi_slopes=relattn.alibi_slopes(H).double(), causal=causal)
    ids = packed_ids(lengths, L)
    out, lse = relattn.attention(q, k, v, **tables, segment_ids=ids, return_lse=True)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v, rel_k, rel_v, rel_bias), grad_out)

    alone_grads = [torch.zeros_like(x) for x in (q, k, v, rel_k, rel_v, rel_bias)]
    for b, row in enumerate(lengths):
        o = 0
        for n in row + ([L - sum(row)] if sum(row) < L else []):  # the -1 tail is a segment too
            sl = slice(o, o + n)
            qs, ks, vs = (x[b:b + 1, :, sl] for x in (q, k, v))
            o_alone, lse_alone = relattn.attention(qs, ks, vs, **tables, return_lse=True)
            torch.testing.assert_close(out[b:b + 1, :, sl], o_alone, rtol=0, atol=1e-12)
            torch.testing.assert_close(lse[b:b + 1, :, sl], lse_alone, rtol=0, atol=1e-12)
            gs = torch.autograd.grad(o_alone, (qs, ks, vs, rel_k, rel_v, rel_bias), grad_out[b:b + 1, :, sl])
            for acc, part, (x, name) in zip(alone_grads[:3], gs[:3], ((q, "q"), (k, "k"), (v, "v"))):
                acc[b:b + 1, :, sl] += part
            for acc, part in zip(alone_grads[3:], gs[3:]):
                acc += part
            o += n
    for name, got, want in zip(("q", "k", "v", "rel_k", "rel_v", "rel_bias"), grads, alone_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"d{name}")


def test_nn_encoder_on_packed_batch_equals_each_sequence_alone():
    from relattn.nn import RelativeTransformerEncoder, RelativeTransformerEncoderLayer

    torch.manual_seed(0)
    layer = RelativeTransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, norm_first=True,
                                            position="shaw", max_distance=8)
    encoder = RelativeTransformerEncoder(layer, num_layers=2).double().eval()
    lengths = [37, 70, 21]
    x = torch.randn(1, sum(lengths), 32, dtype=torch.float64)
    y = encoder(x, segment_ids=packed_ids([lengths], sum(lengths)))
    o = 0
    for n in lengths:
        torch.testing.assert_close(y[:, o:o + n], encoder(x[:, o:o + n]), rtol=0, atol=1e-12)
        o += n


def test_int32_int64_and_strided_ids_agree():
    case = Case("c", rel_bias=True, positions="clip", M=3, B=2, H=2, Lq=70, D=8)
    inp = make_inputs(case, torch.float32)
    ids64 = packed_ids([[10, 60], [35, 35]], 70)
    base = relattn.attention(inp.q, inp.k, inp.v, **inp.kwargs, segment_ids=ids64)
    ids32 = ids64.to(torch.int32)
    strided = torch.stack([ids64, ids64], dim=2)[:, :, 0]  # a non-contiguous view
    assert not strided.is_contiguous()
    for ids in (ids32, strided, (ids32, ids64)):
        assert torch.equal(relattn.attention(inp.q, inp.k, inp.v, **inp.kwargs, segment_ids=ids), base)


def test_one_segment_is_no_segments():
    case = Case("c", rel_k="shared", rel_v="shared", positions="clip", M=3, causal=True, B=2, H=2, Lq=150, D=8)
    inp = make_inputs(case, torch.float32)
    ids = torch.full((2, 150), 7)
    torch.testing.assert_close(relattn.attention(inp.q, inp.k, inp.v, **inp.kwargs, segment_ids=ids),
                               relattn.attention(inp.q, inp.k, inp.v, **inp.kwargs), rtol=0, atol=0)


def test_q_offset_takes_the_ids_of_its_positions():
    """With a cache (q_offset), query i has the id of key position i + q_offset."""
    case = Case("c", rel_bias=True, positions="clip", M=3, causal=True, q_offset=20, B=1, H=2, Lq=30, Lk=50, D=8)
    inp = make_inputs(case, torch.float64)
    ids = packed_ids([[25, 25]], 50)
    got = relattn.attention(inp.q, inp.k, inp.v, **inp.kwargs, segment_ids=ids)
    want = relattn.attention(inp.q, inp.k, inp.v, **inp.kwargs, segment_ids=(ids[:, 20:50], ids))
    assert torch.equal(got, want)
    ref = reference_attention(inp.q, inp.k, inp.v, **inp.kwargs, segment_ids=(ids[:, 20:50], ids))[0]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def test_dropout_with_segments_matches_reference():
    from dropout_reference import keep_factors
    case = Case("c", rel_k="shared", rel_v="shared", positions="clip", M=3, B=2, H=2, Lq=140, D=8)
    ids = segments_for(case, "packed")
    seed = 12345
    op, _ = with_segments(ids)
    inp = make_inputs(case, torch.float64, requires_grad=True)
    got = relattn.attention(inp.q, inp.k, inp.v, **inp.kwargs, segment_ids=ids, dropout_p=0.3,
                            dropout_seed=torch.tensor([seed]))
    keep = keep_factors(seed, 0.3, 2, 2, 140, 140)
    want = reference_attention(inp.q, inp.k, inp.v, **inp.kwargs, segment_ids=ids, dropout_keep=keep)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_empty_inputs():
    for B, L in ((0, 5), (2, 0)):
        q = torch.randn(B, 2, L, 8, requires_grad=True)
        ids = torch.zeros(B, L, dtype=torch.int32)
        out = relattn.attention(q, q, q, segment_ids=ids)
        assert out.shape == (B, 2, L, 8)
        out.sum().backward()
        assert q.grad.shape == q.shape


@pytest.mark.parametrize("segment_ids,match", [
    (torch.zeros(2, 10, dtype=torch.float32), "segment_ids must have an integer dtype"),
    ((torch.zeros(2, 10, dtype=torch.int32), torch.zeros(2, 10, dtype=torch.bool)),
     "k_segment_ids must have an integer dtype"),
    (torch.zeros(2, 9, dtype=torch.int32), r"segment_ids must be \[B, Lk\]"),
    (torch.zeros(3, 10, dtype=torch.int32), r"segment_ids must be \[B, L[qk]\] = \[2, 10\]"),
    ((torch.zeros(2, 10, dtype=torch.int32), torch.zeros(2, 10, 1, dtype=torch.int32)),
     r"k_segment_ids must be \[B, Lk\]"),
    ((torch.zeros(2, 7, dtype=torch.int32), torch.zeros(2, 10, dtype=torch.int32)), r"q_segment_ids must be \[B, Lq\]"),
    ((torch.zeros(2, 10),), "a pair"),
    (torch.full((2, 10), 2**40), "does not fit in int32"),
])
def test_bad_segment_ids(segment_ids, match):
    q = torch.randn(2, 2, 10, 8)
    with pytest.raises((RuntimeError, ValueError), match=match):
        relattn.attention(q, q, q, segment_ids=segment_ids)


def test_bad_q_offset_for_the_single_form():
    q = torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match="Lq \\+ q_offset <= Lk"):
        relattn.attention(q, q, q, segment_ids=torch.zeros(1, 10, dtype=torch.int32), q_offset=1)


def test_op_needs_both_sides():
    q = torch.randn(1, 2, 10, 8)
    ids = torch.zeros(1, 10, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="q_segment_ids and k_segment_ids go together"):
        torch.ops.relattn.attention_forward(q, q, q, None, None, None, None, None, None, None, False, None, 0, 0.0,
                                            None, None, ids)


def test_opcheck_and_compile():
    case = Case("c", rel_k="shared", rel_bias=True, positions="clip", M=3, causal=True, B=2, H=2, Lq=20, D=8)
    inp = make_inputs(case, torch.float32, requires_grad=True)
    ids = segments_for(case, "packed").to(torch.int32)
    args = (*inp.op_args(), 0.0, None, ids, ids)
    torch.library.opcheck(torch.ops.relattn.attention_forward.default, args)
    plain = make_inputs(case, torch.float32)  # no requires_grad: the backward op has no autograd of its own
    out, lse = torch.ops.relattn.attention_forward(*plain.op_args(), 0.0, None, ids, ids)
    grad_out, _ = make_grad_outputs(case, torch.float32)
    torch.library.opcheck(torch.ops.relattn.attention_backward.default,
                          (grad_out, None, plain.q, plain.k, plain.v, out, lse, *plain.op_args()[3:], 0.0, None, ids,
                           ids))

    def f(q, k, v, ids):
        return relattn.attention(q, k, v, **inp.kwargs, segment_ids=ids)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(inp.q, inp.k, inp.v, ids), f(inp.q, inp.k, inp.v, ids), rtol=0, atol=0)


needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and relattn.cuda_kernels_built()),
                                reason="needs a CUDA device and relattn's CUDA kernels")


# "": the segment-only instances of the tensor-core kernels; "dropout": RELATTN_CUDA_SEGMENTS=dropout, the
# dropout instances with every pair kept (the route kept for timing the two).
@needs_cuda
@pytest.mark.parametrize("route", ["", "dropout"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case,kind", CASES + [
    (Case("hd128_shaw_kv_long", rel_k="shared", rel_v="shared", positions="clip", M=64, causal=True, B=2, H=4, Hk=2,
          Lq=700, D=128), "packed"),
    (Case("hd64_plain_long", B=2, H=2, Lq=600, D=64), "packed"),
], ids=_id)
def test_cuda_segments_match_reference(case, kind, dtype, route, monkeypatch):
    """The CUDA kernels (tile ranges, per-pair test) against the float64 reference: out, lse, every gradient."""
    if route and dtype == torch.float32:
        pytest.skip("float32 runs the SIMT kernels, which have one route")
    monkeypatch.setenv("RELATTN_CUDA_SEGMENTS", route)
    segment_ids = segments_for(case, kind)
    inp = make_inputs(case.with_(grad_lse=True), dtype, requires_grad=True)
    cuda = {n: (t.detach().cuda().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t)
            for n, t in {"q": inp.q, "k": inp.k, "v": inp.v, **inp.kwargs}.items()}
    seg_cuda = tuple(x.cuda() for x in segment_ids) if isinstance(segment_ids, tuple) else segment_ids.cuda()
    q, k, v = cuda.pop("q"), cuda.pop("k"), cuda.pop("v")
    out, lse = relattn.attention(q, k, v, **cuda, return_lse=True, segment_ids=seg_cuda)
    grad_out, grad_lse = make_grad_outputs(case.with_(grad_lse=True), dtype)
    leaves = {"q": q, "k": k, "v": v, **{n: cuda[n] for n in ("rel_k", "rel_v", "rel_bias") if cuda.get(n) is not None}}
    got = torch.autograd.grad([out, lse], list(leaves.values()), [grad_out.cuda().to(out.dtype), grad_lse.cuda()])

    _, ref = with_segments(segment_ids)
    ref_inp = inp.as_dtype(torch.float64)
    ref_out, ref_lse = ref(ref_inp, torch.float64)
    ref_leaves = ref_inp.leaves()
    want = torch.autograd.grad([ref_out, ref_lse], list(ref_leaves.values()), [grad_out.double(), grad_lse.double()])
    naive_out, naive_grads = None, [None] * len(want)
    if dtype in (torch.float16, torch.bfloat16):
        naive_inp = inp.as_dtype(dtype)
        naive_out, naive_lse = ref(naive_inp, dtype)
        naive_grads = torch.autograd.grad([naive_out, naive_lse], list(naive_inp.leaves().values()),
                                          [grad_out.to(dtype), grad_lse.to(naive_lse.dtype)])
    assert_accurate("out", out.cpu(), ref_out, dtype, naive_out)
    assert_accurate("lse", lse.cpu(), ref_lse, torch.float32)
    for name, g, w, n in zip(leaves, got, want, naive_grads):
        assert_accurate(f"d{name}", g.cpu(), w, dtype, n)
