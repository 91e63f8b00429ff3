"""Relations between calls that SPEC §1 implies, checked on the op alone (float64, so "equal" means equal
to rounding): query chunks with q_offset are rows of the whole, grouped kv heads are repeated kv heads,
shared tables are per-head tables, rel_index is buckets written out, ALiBi is a bias table, and inputs
that change nothing change nothing."""
import math

import torch

import relattn
from cases import Case, Inputs, gradients, make_grad_outputs, make_inputs, run_op

F64 = torch.float64
CASE = Case("semantics", rel_k="shared", rel_v="shared", rel_bias=True, positions="clip", M=6, padding="random",
            H=4, Hk=2, Lq=70, Lk=140, D=16, Dv=8, grad_lse=True)


def close(a, b, what=""):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{what}: {m}")


def test_query_chunks_with_q_offset_are_rows_of_the_whole():
    # Chunked / ring attention: the queries of rows [a, b) with q_offset = a see what rows a..b-1 of the
    # whole see. Causal, with T5 buckets and ALiBi, so that every position-dependent term is exercised.
    case = CASE.with_(positions="t5", t5=(16, 40, True), alibi=True, causal=True, Lq=140)
    inp = make_inputs(case, F64)
    out, lse = run_op(inp)
    for a, b in ((0, 1), (3, 70), (64, 129), (139, 140)):
        chunk = Inputs(inp.q[:, :, a:b], inp.k, inp.v, {**inp.kwargs, "q_offset": a})
        chunk_out, chunk_lse = run_op(chunk)
        close(chunk_out, out[:, :, a:b], f"out of rows {a}:{b}")
        close(chunk_lse, lse[:, :, a:b], f"lse of rows {a}:{b}")


def test_grouped_kv_heads_are_repeated_kv_heads():
    inp = make_inputs(CASE, F64, requires_grad=True)
    group = CASE.H // CASE.Hk
    k_rep = inp.k.detach().repeat_interleave(group, dim=1).requires_grad_()
    v_rep = inp.v.detach().repeat_interleave(group, dim=1).requires_grad_()
    rep = Inputs(inp.q, k_rep, v_rep, inp.kwargs)
    grad_out, grad_lse = make_grad_outputs(CASE, F64)
    out, lse = run_op(inp)
    rep_out, rep_lse = run_op(rep)
    close(out, rep_out, "out")
    close(lse, rep_lse, "lse")
    g = gradients(out, lse, {"k": inp.k, "v": inp.v}, grad_out, grad_lse)
    g_rep = gradients(rep_out, rep_lse, {"k": k_rep, "v": v_rep}, grad_out, grad_lse)
    for name in ("k", "v"):
        summed = g_rep[name].unflatten(1, (CASE.Hk, group)).sum(2)  # the heads that share a kv head
        close(g[name], summed, f"d{name}")


def test_shared_tables_are_per_head_tables():
    inp = make_inputs(CASE, F64, requires_grad=True)
    per_head = {n: inp.kwargs[n].detach().expand(CASE.H, *inp.kwargs[n].shape).clone().requires_grad_()
                for n in ("rel_k", "rel_v")}
    other = Inputs(inp.q, inp.k, inp.v, {**inp.kwargs, **per_head})
    grad_out, grad_lse = make_grad_outputs(CASE, F64)
    out, lse = run_op(inp)
    ph_out, ph_lse = run_op(other)
    close(out, ph_out, "out")
    shared_grads = gradients(out, lse, {n: inp.kwargs[n] for n in per_head}, grad_out, grad_lse)
    per_head_grads = gradients(ph_out, ph_lse, per_head, grad_out, grad_lse)
    for name in per_head:
        close(shared_grads[name], per_head_grads[name].sum(0), f"d{name}")


def test_rel_index_is_buckets_written_out():
    # rel_index[i, j] = buckets[clamp(j - i - q_offset, -M, M) + M]: the same attention, 2-D or 3-D.
    case = CASE.with_(rel_k="per_head", alibi=True, causal=True, q_offset=-9)
    inp = make_inputs(case, F64, requires_grad=True)
    buckets, M = inp.kwargs["buckets"], case.M
    d = torch.arange(case.Lk).view(1, -1) - torch.arange(case.Lq).view(-1, 1) - case.q_offset
    index = buckets[d.clamp(-M, M) + M]
    grad_out, grad_lse = make_grad_outputs(case, F64)
    out, lse = run_op(inp)
    grads = gradients(out, lse, inp.leaves(), grad_out, grad_lse)
    for rel_index in (index, index.expand(case.B, -1, -1).to(torch.int32)):
        kwargs = {**inp.kwargs, "buckets": None, "rel_index": rel_index}
        other = Inputs(inp.q, inp.k, inp.v, kwargs)
        o_out, o_lse = run_op(other)
        close(o_out, out, f"out with rel_index {tuple(rel_index.shape)}")
        o_grads = gradients(o_out, o_lse, other.leaves(), grad_out, grad_lse)
        for name in grads:
            close(o_grads[name], grads[name], f"d{name} with rel_index {tuple(rel_index.shape)}")


def test_alibi_is_a_bias_table():
    # Within the clipping window, ALiBi's -m_h*|d| is the bias table bias[h, r] = -m_h*|r - M|.
    case = CASE.with_(rel_k=None, rel_v=None, rel_bias=False, M=200)
    inp = make_inputs(case, F64)
    slopes = relattn.alibi_slopes(case.H).double()
    r = torch.arange(2 * case.M + 1)
    bias = -slopes.view(-1, 1) * (r - case.M).abs().double().view(1, -1)
    with_alibi = Inputs(inp.q, inp.k, inp.v, {**inp.kwargs, "alibi_slopes": slopes})
    with_bias = Inputs(inp.q, inp.k, inp.v, {**inp.kwargs, "rel_bias": bias})
    for got, expected in zip(run_op(with_alibi), run_op(with_bias)):
        close(got, expected, "ALiBi vs bias table")


def test_inputs_that_change_nothing():
    inp = make_inputs(CASE.with_(rel_k=None, rel_v=None, rel_bias=False, positions=None), F64)
    out, lse = run_op(inp)
    D, Lq, Lk = CASE.D, CASE.Lq, CASE.Lk
    unchanged = {
        # SPEC: buckets or rel_index without any relative tensor is allowed and changes nothing.
        "buckets without tables": dict(buckets=relattn.clip_buckets(3)),
        "rel_index without tables": dict(rel_index=torch.zeros(Lq, Lk, dtype=torch.long)),
        "default scale spelled out": dict(scale=1 / math.sqrt(D)),
        "zero tables": dict(rel_k=torch.zeros(5, D, dtype=F64), rel_v=torch.zeros(CASE.H, 5, CASE.Dv, dtype=F64),
                            rel_bias=torch.zeros(CASE.H, 5, dtype=F64), buckets=relattn.clip_buckets(2)),
        "zero ALiBi slopes": dict(alibi_slopes=torch.zeros(CASE.H, dtype=F64)),
        "q_offset without position terms": dict(q_offset=1000),
    }
    for what, extra in unchanged.items():
        other = Inputs(inp.q, inp.k, inp.v, {**inp.kwargs, **extra})
        got_out, got_lse = run_op(other)
        close(got_out, out, what)
        close(got_lse, lse, what)


def test_no_mask_equals_an_all_false_mask():
    inp = make_inputs(CASE, F64)
    no_mask = Inputs(inp.q, inp.k, inp.v, {**inp.kwargs, "key_padding_mask": None})
    all_false = Inputs(inp.q, inp.k, inp.v,
                       {**inp.kwargs, "key_padding_mask": torch.zeros(CASE.B, CASE.Lk, dtype=torch.bool)})
    for got, expected in zip(run_op(all_false), run_op(no_mask)):
        close(got, expected, "all-False mask")


def test_return_lse():
    inp = make_inputs(CASE, torch.float32)
    out = relattn.attention(inp.q, inp.k, inp.v, **inp.kwargs)
    assert isinstance(out, torch.Tensor)
    out2, lse = relattn.attention(inp.q, inp.k, inp.v, **inp.kwargs, return_lse=True)
    assert torch.equal(out, out2) and lse.shape == (CASE.B, CASE.H, CASE.Lq)
