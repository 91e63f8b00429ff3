"""Run twice, the op gives bit-identical results: the backward has no atomics or order-dependent
reductions (the gradients of k, v and the shared tables sum over heads, batches and query blocks)."""
import pytest
import torch

from cases import CPU_BACKWARD_ALGORITHMS, set_cpu_backward, Case, gradients, make_grad_outputs, make_inputs, run_op

CASE = Case("determinism", rel_k="shared", rel_v="shared", rel_bias=True, positions="clip", M=4, alibi=True,
            padding="random", q_offset=-20, H=4, Hk=1, Lq=150, Lk=300, D=16, grad_lse=True)


@pytest.mark.parametrize("algorithm", ("auto", "fused", "fused-chunks", "two-pass"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_forward_and_backward_are_deterministic(dtype, algorithm, monkeypatch):
    # the CPU backward's algorithm; fused-chunks: the kv groups' query blocks split into 3 tasks each
    set_cpu_backward(monkeypatch, algorithm)
    inp = make_inputs(CASE, dtype, requires_grad=True)
    grad_out, grad_lse = make_grad_outputs(CASE, dtype)
    runs = []
    for _ in range(2):
        out, lse = run_op(inp)
        runs.append({"out": out.detach(), "lse": lse.detach(), **gradients(out, lse, inp.leaves(), grad_out, grad_lse)})
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), f"{name} differs between two identical runs"
