"""Queries that see no key at all (SPEC §1): out 0, lse -inf, zero gradients, never NaN — whether the keys
are all padding, all in the future (causal with a negative q_offset), or both masks together."""
import pytest
import torch

import relattn
from cases import Case, Inputs, gradients, make_grad_outputs, make_inputs, run_op

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
TABLES = dict(rel_k="per_head", rel_v="shared", rel_bias=True, positions="clip", M=3, alibi=True)


def _run_with_grads(case, dtype):
    """(out, lse, {name: grad}) with grad_out and grad_lse both nonzero everywhere."""
    inp = make_inputs(case.with_(grad_lse=True), dtype, requires_grad=True)
    out, lse = run_op(inp)
    grad_out, grad_lse = make_grad_outputs(case.with_(grad_lse=True), dtype)
    return inp, out, lse, gradients(out, lse, inp.leaves(), grad_out, grad_lse)


def _assert_finite(grads):
    for name, g in grads.items():
        assert torch.isfinite(g).all(), f"d{name} is not finite"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_keys_padded(dtype):
    # Batch 1 is all padding; batch 0 is untouched by it.
    case = Case("padded_batch", padding="last_batch", B=2, H=4, Hk=2, Lq=9, Lk=70, D=16, **TABLES)
    inp, out, lse, grads = _run_with_grads(case, dtype)
    _assert_finite(grads)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(lse[1], torch.full_like(lse[1], float("-inf")))
    assert torch.isfinite(out[0]).all() and torch.isfinite(lse[0]).all()
    for name in ("q", "k", "v"):
        assert torch.equal(grads[name][1], torch.zeros_like(grads[name][1])), f"d{name} of the padded batch"

    # The padded batch adds nothing to the table gradients: they equal those of batch 0 run alone.
    def leaf(t):
        return t.detach().requires_grad_()

    alone = Inputs(leaf(inp.q[:1]), leaf(inp.k[:1]), leaf(inp.v[:1]),
                   {**inp.kwargs, **{n: leaf(inp.kwargs[n]) for n in ("rel_k", "rel_v", "rel_bias")},
                    "key_padding_mask": inp.kwargs["key_padding_mask"][:1]})
    out0, lse0 = run_op(alone)
    grad_out, grad_lse = make_grad_outputs(case.with_(grad_lse=True), dtype)
    grads0 = gradients(out0, lse0, alone.leaves(), grad_out[:1], grad_lse[:1])
    assert torch.equal(out0, out[:1])
    for name in ("rel_k", "rel_v", "rel_bias"):
        torch.testing.assert_close(grads[name], grads0[name], msg=f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_causal_negative_offset(dtype):
    # Query i sits at position i - 5: rows 0..4 come before every key.
    case = Case("causal_negative_offset", causal=True, q_offset=-5, B=1, H=2, Lq=70, Lk=70, D=16, **TABLES)
    inp, out, lse, grads = _run_with_grads(case, dtype)
    _assert_finite(grads)
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    assert torch.isinf(lse[:, :, :5]).all() and (lse[:, :, :5] < 0).all()
    assert torch.isfinite(lse[:, :, 5:]).all()
    assert torch.equal(grads["q"][:, :, :5], torch.zeros_like(grads["q"][:, :, :5]))
    # The last 5 keys lie after every query's position: nobody attends to them.
    assert torch.equal(grads["k"][:, :, -5:], torch.zeros_like(grads["k"][:, :, -5:]))
    assert torch.equal(grads["v"][:, :, -5:], torch.zeros_like(grads["v"][:, :, -5:]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_row_masked(dtype):
    # q_offset far before the keys: no query sees anything; every output is 0 and every gradient is 0.
    case = Case("all_masked", causal=True, q_offset=-1000, B=2, H=2, Hk=1, Lq=17, Lk=33, D=8, **TABLES)
    inp, out, lse, grads = _run_with_grads(case, dtype)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isinf(lse).all() and (lse < 0).all()
    for name, g in grads.items():
        assert torch.equal(g, torch.zeros_like(g)), f"d{name}"


def test_padding_and_causal_together_mask_a_row():
    # Key 0 is padding and query 0 (causal, offset 0) sees only key 0: row 0 is fully masked, row 1 is not.
    q = torch.randn(1, 1, 3, 4, requires_grad=True)
    k = torch.randn(1, 1, 3, 4, requires_grad=True)
    v = torch.randn(1, 1, 3, 4, requires_grad=True)
    mask = torch.tensor([[True, False, False]])
    out, lse = relattn.attention(q, k, v, key_padding_mask=mask, causal=True, return_lse=True)
    assert torch.equal(out[0, 0, 0], torch.zeros(4)) and lse[0, 0, 0].item() == float("-inf")
    torch.testing.assert_close(out[0, 0, 1], v[0, 0, 1])  # its only visible key
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    assert torch.equal(q.grad[0, 0, 0], torch.zeros(4))
    assert torch.equal(k.grad[0, 0, 0], torch.zeros(4)) and torch.equal(v.grad[0, 0, 0], torch.zeros(4))
