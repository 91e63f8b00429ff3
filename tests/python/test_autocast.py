"""relattn.attention under CPU autocast (SPEC §4), as torch's own matmul-like ops behave: q, k, v run in
the autocast dtype, tables of another dtype run in float32, the output has the autocast dtype, gradients
reach the float32 leaves, and float64 inputs are left alone."""
import pytest
import torch

from cases import Case, Inputs, assert_accurate, gradients, make_grad_outputs, make_inputs, run_op, run_reference

CASE = Case("autocast", rel_k="shared", rel_v="per_head", rel_bias=True, positions="clip", M=4, alibi=True,
            padding="random", causal=True, q_offset=3, H=4, Hk=2, Lq=17, Lk=97, D=40, Dv=24, grad_lse=True)


def _as_autocast_runs_it(inp, dtype):
    """q, k, v in the autocast dtype; tables in float32."""
    def table(t):
        return t.detach().float() if torch.is_tensor(t) and t.is_floating_point() else t
    return Inputs(inp.q.detach().to(dtype), inp.k.detach().to(dtype), inp.v.detach().to(dtype),
                  {n: table(t) for n, t in inp.kwargs.items()})


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("table_dtype", (torch.float32, torch.float16), ids=lambda d: f"tables_{d}")
def test_autocast_cpu(dtype, table_dtype):
    inp = make_inputs(CASE.with_(table_dtype=table_dtype), torch.float32, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        out, lse = run_op(inp)
    assert out.dtype == dtype and lse.dtype == torch.float32

    cast = _as_autocast_runs_it(inp, dtype)
    ref_out, _ = run_reference(cast, torch.float64)
    naive_out, _ = run_reference(cast.as_dtype(dtype), dtype)
    assert_accurate("out", out, ref_out, dtype, naive_out)
    direct_out, direct_lse = run_op(cast)
    assert torch.equal(out, direct_out) and torch.equal(lse, direct_lse)

    grad_out, grad_lse = make_grad_outputs(CASE, dtype)
    grads = gradients(out, lse, inp.leaves(), grad_out, grad_lse)
    cast_leaves = {n: t.requires_grad_() for n, t in cast.leaves().items()}
    direct = gradients(*run_op(cast), cast_leaves, grad_out, grad_lse)
    for name, leaf in inp.leaves().items():
        assert grads[name].dtype == leaf.dtype, f"d{name} must come back in its leaf's dtype"
        torch.testing.assert_close(grads[name], direct[name].to(leaf.dtype), msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float64), ids=str)
def test_autocast_leaves_alone_inputs_of_its_dtype_and_float64(dtype):
    inp = make_inputs(CASE, dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, lse = run_op(inp)
        assert torch.mm(inp.q[0, 0], inp.k[0, 0].T).dtype == dtype  # torch's own rule, for comparison
    expected_out, expected_lse = run_op(inp)
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)
