"""Empty inputs (SPEC §5): B=0, H=0 (with Hk=0), Lq=0, Lk=0 give correctly shaped results — with Lk=0
every query sees no key, so out is 0 and lse -inf — and the backward runs, giving zero gradients."""
import pytest
import torch

from cases import Case, case_id, gradients, make_grad_outputs, make_inputs, run_op

FEATURES = dict(rel_k="per_head", rel_v="shared", rel_bias=True, positions="clip", M=3, alibi=True,
                padding="random", causal=True, grad_lse=True, D=8, Dv=4)

CASES = [
    Case("B0", B=0, H=2, Lq=5, Lk=7, **FEATURES),
    Case("B0_index3d", B=0, H=2, Lq=5, Lk=7, **{**FEATURES, "positions": "index3d"}),
    # alibi_slopes(0) is an error, so the H=0 case has no ALiBi (and shared tables: per-head ones are [0, R, D]).
    Case("H0_Hk0", H=0, Hk=0, Lq=5, Lk=7, **{**FEATURES, "alibi": False, "rel_k": "shared"}),
    Case("H0_Hk0_per_head", H=0, Hk=0, Lq=5, Lk=7, **{**FEATURES, "alibi": False, "rel_v": "per_head"}),
    Case("Lq0", Lq=0, Lk=7, **FEATURES),
    Case("Lq0_index2d", Lq=0, Lk=7, **{**FEATURES, "positions": "index2d"}),
    Case("Lk0", Lq=5, Lk=0, **FEATURES),
    Case("Lk0_index3d_gqa", H=4, Hk=2, Lq=5, Lk=0, **{**FEATURES, "positions": "index3d"}),
    Case("Lk0_no_features", Lq=5, Lk=0, D=8),
    Case("Lq0_Lk0", Lq=0, Lk=0, **FEATURES),
]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_empty_inputs(case, dtype):
    inp = make_inputs(case, dtype, requires_grad=True)
    out, lse = run_op(inp)
    assert out.shape == (case.B, case.H, case.Lq, case.Dv) and out.dtype == dtype
    assert lse.shape == (case.B, case.H, case.Lq) and lse.dtype == torch.float32
    if case.Lk == 0:
        assert torch.equal(out, torch.zeros_like(out))
        assert torch.equal(lse, torch.full_like(lse, float("-inf")))

    grad_out, grad_lse = make_grad_outputs(case, dtype)
    grads = gradients(out, lse, inp.leaves(), grad_out, grad_lse)
    for name, leaf in inp.leaves().items():
        g = grads[name]
        assert g is not None and g.shape == leaf.shape and g.dtype == leaf.dtype, f"d{name}"
        assert torch.equal(g, torch.zeros_like(g)), f"d{name} must be zero: nothing attends to anything"
