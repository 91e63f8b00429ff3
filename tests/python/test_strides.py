"""Any strides are accepted (SPEC §1): views, storage offsets, non-unit last-dim strides and expanded
tensors give the same results as contiguous copies of the same values, forward and backward."""
import pytest
import torch

import relattn
from cases import (Case, Inputs, assert_accurate, gradients, make_grad_outputs, make_inputs, run_op,
                   run_reference)

CASE = Case("strides", rel_k="per_head", rel_v="shared", rel_bias=True, positions="index3d", R_index=6,
            alibi=True, padding="random", causal=True, q_offset=3, H=4, Hk=2, Lq=70, Lk=140, D=16, Dv=8,
            grad_lse=True)


def blhd_view(t):
    """The same values as a [B, H, L, D] view of a contiguous [B, L, H, D] tensor (x.transpose(1, 2))."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def with_offset(t):
    """The same values at a nonzero storage offset, with padding between rows of dim -2 (a slice)."""
    big = t.new_zeros(*t.shape[:-2], t.shape[-2] + 3, t.shape[-1] + 5)
    big[..., 3:, 5:] = t
    return big[..., 3:, 5:]


def strided_last_dim(t):
    """The same values with stride 2 in the last dimension."""
    big = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
    big[..., ::2] = t
    return big[..., ::2]


def transposed_last_two(t):
    """The same values stored with the last two dimensions swapped (last-dim stride != 1)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


LAYOUTS = {"blhd_view": blhd_view, "storage_offset": with_offset, "last_dim_stride_2": strided_last_dim}


def _relayout(inp, q_k_v=None, tables=None, others=None):
    """A copy of `inp` whose q/k/v, tables and other tensors are laid out by the given functions."""
    def apply(fn, t):
        return t if fn is None or t is None else fn(t.detach()).requires_grad_(t.requires_grad)

    kw = dict(inp.kwargs)
    for n in ("rel_k", "rel_v", "rel_bias"):
        kw[n] = apply(tables, kw.get(n))
    for n in ("rel_index", "key_padding_mask"):
        kw[n] = apply(others, kw.get(n))
    return Inputs(apply(q_k_v, inp.q), apply(q_k_v, inp.k), apply(q_k_v, inp.v), kw)


def _is_plain(t):
    return t.is_contiguous() and t.storage_offset() == 0


def _assert_same_results(contiguous, strided, grad_out, strided_grad_out, grad_lse):
    tensors = [strided.q, strided.k, strided.v, strided_grad_out,
               *(t for t in strided.kwargs.values() if isinstance(t, torch.Tensor))]
    assert not all(_is_plain(t) for t in tensors), "the test meant to pass strided tensors"
    # Close, not bitwise: BLAS may take another code path for another alignment of the same values.
    out, lse = run_op(contiguous)
    s_out, s_lse = run_op(strided)
    torch.testing.assert_close(s_out, out)
    torch.testing.assert_close(s_lse, lse)
    grads = gradients(out, lse, contiguous.leaves(), grad_out, grad_lse)
    s_grads = gradients(s_out, s_lse, strided.leaves(), strided_grad_out, grad_lse)
    for name in grads:
        torch.testing.assert_close(s_grads[name], grads[name], msg=lambda m: f"d{name}: {m}")
    # And both agree with the reference (so the comparison is not between two wrong answers).
    assert_accurate("out", s_out, run_reference(contiguous, torch.float64)[0], torch.float32)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_qkv_and_grad_out_layouts(layout):
    fn = LAYOUTS[layout]
    inp = make_inputs(CASE, torch.float32, requires_grad=True)
    grad_out, grad_lse = make_grad_outputs(CASE, torch.float32)
    _assert_same_results(inp, _relayout(inp, q_k_v=fn), grad_out, fn(grad_out), grad_lse)


def test_table_mask_and_index_layouts():
    inp = make_inputs(CASE, torch.float32, requires_grad=True)
    strided = _relayout(inp, tables=transposed_last_two, others=transposed_last_two)
    strided.kwargs["alibi_slopes"] = strided_last_dim(inp.kwargs["alibi_slopes"])
    grad_out, grad_lse = make_grad_outputs(CASE, torch.float32)
    _assert_same_results(inp, strided, grad_out, transposed_last_two(grad_out), grad_lse)


def test_strided_buckets_and_offset_tables():
    case = CASE.with_(positions="clip", M=5)
    inp = make_inputs(case, torch.float32, requires_grad=True)
    strided = _relayout(inp, tables=with_offset, others=strided_last_dim)
    strided.kwargs["buckets"] = strided_last_dim(inp.kwargs["buckets"])
    grad_out, grad_lse = make_grad_outputs(case, torch.float32)
    _assert_same_results(inp, strided, grad_out, grad_out, grad_lse)


@pytest.mark.parametrize("index", ["2d_expanded_to_3d", "scalar_expanded_to_2d", "scalar_expanded_to_3d"])
def test_expanded_rel_index(index):
    B, Lq, Lk = CASE.B, CASE.Lq, CASE.Lk
    inp = make_inputs(CASE, torch.float32, requires_grad=True)
    if index == "2d_expanded_to_3d":
        expanded = torch.randint(0, CASE.R, (Lq, Lk), generator=torch.Generator().manual_seed(3)).expand(B, Lq, Lk)
    elif index == "scalar_expanded_to_2d":
        expanded = torch.tensor(4).expand(Lq, Lk)
    else:
        expanded = torch.tensor(4, dtype=torch.int32).expand(B, Lq, Lk)
    strided = Inputs(inp.q, inp.k, inp.v, {**inp.kwargs, "rel_index": expanded})
    contiguous = Inputs(inp.q, inp.k, inp.v, {**inp.kwargs, "rel_index": expanded.contiguous()})
    grad_out, grad_lse = make_grad_outputs(CASE, torch.float32)
    _assert_same_results(contiguous, strided, grad_out, grad_out, grad_lse)


def test_backward_op_with_strided_grad_out_out_and_lse():
    # attention_backward called directly with views: grad_out/out as [B, L, H, Dv] views, lse and
    # grad_lse with offsets; the results equal those of contiguous arguments.
    inp = make_inputs(CASE, torch.float32)
    args = inp.op_args()
    out, lse = torch.ops.relattn.attention_forward(*args)
    grad_out, grad_lse = make_grad_outputs(CASE, torch.float32)
    expected = torch.ops.relattn.attention_backward(grad_out, grad_lse, *args[:3], out, lse, *args[3:])
    got = torch.ops.relattn.attention_backward(blhd_view(grad_out), with_offset(grad_lse), *args[:3],
                                               strided_last_dim(out), with_offset(lse), *args[3:])
    for name, g, e in zip(("dq", "dk", "dv", "drel_k", "drel_v", "drel_bias"), got, expected):
        torch.testing.assert_close(g, e, msg=lambda m: f"{name}: {m}")


def test_broadcast_grad_out():
    # out.sum() backpropagates an expanded (all-stride-0) gradient.
    inp = make_inputs(CASE.with_(grad_lse=False), torch.float32, requires_grad=True)
    out = relattn.attention(inp.q, inp.k, inp.v, **inp.kwargs)
    got = torch.autograd.grad(out.sum(), list(inp.leaves().values()))
    out = relattn.attention(inp.q, inp.k, inp.v, **inp.kwargs)
    expected = torch.autograd.grad(out, list(inp.leaves().values()), torch.ones_like(out))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
