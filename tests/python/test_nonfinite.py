"""NaN in, NaN out (SPEC §5: never a garbage result without a word), and double backward raising.

A NaN score — from a NaN in q, in k or in a table entry a pair uses — makes the rows that see it NaN, out
and lse, as the formula (and torch's SDPA) does. It must neither be dropped as a weight of 0 (the clamp of a
vectorised exp) nor make its row look fully masked (out = 0, lse = -inf: a max that passes over NaN); every
other row stays exactly what it is without the NaN."""
import dataclasses

import pytest
import torch

from cases import ALL_DTYPES, Case, make_inputs, run_op
from test_cuda import to_device

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA device"))]
NAN = float("nan")
CASE = Case("nonfinite", B=2, H=4, Hk=2, Lq=40, Lk=50, D=16, rel_k="shared", rel_v="shared", rel_bias=True,
            positions="clip", M=6, table_dtype=torch.float32)


def inputs(dtype, device, case=CASE):
    return to_device(make_inputs(case, dtype), device)


def assert_rows(got, want, nan_rows):
    """out/lse rows where nan_rows ([B, H, Lq] bool) is set are all NaN; the others equal `want`'s."""
    out, lse = got
    want_out, want_lse = want
    assert torch.isnan(out[nan_rows]).all() and torch.isnan(lse[nan_rows]).all(), "rows that see a NaN"
    keep = ~nan_rows
    assert nan_rows.any() and keep.any()
    torch.testing.assert_close(out[keep], want_out[keep], rtol=0, atol=0)
    torch.testing.assert_close(lse[keep], want_lse[keep], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_nan_in_one_query_row(dtype, device):
    inp = inputs(dtype, device)
    want = run_op(inp)
    inp.q[1, 2, 7, 3] = NAN
    nan_rows = torch.zeros(2, 4, 40, dtype=torch.bool, device=device)
    nan_rows[1, 2, 7] = True
    assert_rows(run_op(inp), want, nan_rows)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_nan_in_one_key(dtype, device):
    # Causal: queries before key 21 never see it and stay as they were; the heads of the other kv group too.
    inp = inputs(dtype, device, CASE.with_(causal=True))
    want = run_op(inp)
    inp.k[0, 1, 21, 5] = NAN
    nan_rows = torch.zeros(2, 4, 40, dtype=torch.bool, device=device)
    nan_rows[0, 2:, 21:] = True
    assert_rows(run_op(inp), want, nan_rows)
    # The same key masked out: it is no longer seen, and nothing is NaN.
    mask = torch.zeros(2, 50, dtype=torch.bool, device=device)
    mask[0, 21] = True
    inp.kwargs["key_padding_mask"] = mask
    clean = dataclasses.replace(inp, k=inp.k.nan_to_num(0.0))
    torch.testing.assert_close(run_op(inp), run_op(clean), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_in_a_used_bias_entry(device):
    # Bucket 6 + 3 (distance 3) of head 1: every query with a key 3 ahead sees it (non-causal).
    inp = inputs(torch.float32, device)
    want = run_op(inp)
    inp.kwargs["rel_bias"][1, 9] = NAN
    nan_rows = torch.zeros(2, 4, 40, dtype=torch.bool, device=device)
    nan_rows[:, 1, :47] = True  # query i sees key i + 3 < 50
    assert_rows(run_op(inp), want, nan_rows)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", ["q", "k"])
def test_nan_in_a_split_decode_step(where, device, monkeypatch):
    # One query over 5000 keys of one batch row and head: the keys are split into chunks whose partial
    # results are combined; a NaN in one chunk (k) or in all of them (q) must survive the combination.
    monkeypatch.setenv("RELATTN_CUDA_SPLITS", "3")
    inp = inputs(torch.float32, device, CASE.with_(B=1, H=1, Hk=1, Lq=1, Lk=5000, q_offset=4999))
    getattr(inp, where)[0, 0, 4000 if where == "k" else 0, 0] = NAN
    out, lse = run_op(inp)
    assert torch.isnan(out).all() and torch.isnan(lse).all()


# -- double backward -------------------------------------------------------------------------------------


def test_double_backward_raises():
    inp = make_inputs(CASE.with_(Lq=5, Lk=6, table_dtype=None), torch.float64, requires_grad=True)
    dq, = torch.autograd.grad(run_op(inp)[0].square().sum(), inp.q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        dq.sum().backward()


def test_create_graph_leaves_first_order_gradients_right():
    # create_graph=True for the rest of a model (e.g. a gradient penalty elsewhere) still gets the same
    # first-order gradients through relattn.
    inp = make_inputs(CASE.with_(Lq=5, Lk=6, table_dtype=None), torch.float64, requires_grad=True)
    leaves = list(inp.leaves().values())
    assert len(leaves) == 6
    loss = run_op(inp)[0].square().sum()
    with_graph = torch.autograd.grad(loss, leaves, create_graph=True, retain_graph=True)
    without = torch.autograd.grad(loss, leaves)
    for a, b in zip(with_graph, without):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
