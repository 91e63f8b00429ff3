"""torch.autograd.gradcheck in float64 for every differentiable input (q, k, v, rel_k, rel_v, rel_bias),
through out and lse, on small shapes that cover the features (SPEC §2, §6)."""
import pytest
import torch

import relattn
from cases import CPU_BACKWARD_ALGORITHMS, set_cpu_backward, Case, case_id, make_inputs

SMALL = dict(B=2, H=2, Lq=5, Lk=6, D=4, Dv=3)

CASES = [
    Case("plain", **SMALL),
    Case("shaw_shared_clip", rel_k="shared", rel_v="shared", positions="clip", M=2, **SMALL),
    Case("shaw_per_head_t5_q_offset", rel_k="per_head", rel_v="per_head", positions="t5", t5=(8, 6, True),
         q_offset=1, **{**SMALL, "Lk": 7}),
    Case("bias_index3d_padding_gqa", rel_bias=True, positions="index3d", R_index=4, padding="random",
         **{**SMALL, "H": 4, "Hk": 2}),
    # Rows 0 and 1 see no key: their gradients must be zero, the rest exact.
    Case("bias_rel_k_index2d_causal_negative_offset", rel_k="per_head", rel_bias=True, positions="index2d",
         R_index=3, causal=True, q_offset=-2, **SMALL),
    Case("alibi_causal_offset_mqa_rel_v", alibi=True, causal=True, q_offset=2, rel_v="per_head",
         positions="clip", M=1, **{**SMALL, "H": 4, "Hk": 1}),
    Case("everything_t5_unidirectional", rel_k="per_head", rel_v="shared", rel_bias=True, positions="t5",
         t5=(4, 6, False), alibi=True, padding="random", causal=True, q_offset=-1, scale=0.7,
         **{**SMALL, "H": 4, "Hk": 2}),
    Case("one_query_one_key", rel_k="shared", rel_v="per_head", rel_bias=True, positions="clip", M=1,
         B=1, H=2, Lq=1, Lk=1, D=3, Dv=2),
]

# Several query and key tiles (the kernel tiles 64 queries x 128 keys), with tiles beyond ±M. Too many
# inputs for the full Jacobian: fast_mode checks a random projection of it instead.
MULTI_TILE = Case("multi_tile_fast_mode", rel_k="shared", rel_v="per_head", rel_bias=True, positions="clip",
                  M=3, padding="random", q_offset=10, B=1, H=2, Hk=1, Lq=70, Lk=140, D=4, Dv=3)


def _attention_of_leaves(inp):
    """f(*leaves) -> (out, lse) for gradcheck, the non-differentiable arguments held fixed."""
    names = list(inp.leaves())

    def f(*tensors):
        named = dict(zip(names, tensors))
        kwargs = {**inp.kwargs, **{n: t for n, t in named.items() if n not in ("q", "k", "v")}}
        out, lse = relattn.attention(named["q"], named["k"], named["v"], **kwargs, return_lse=True)
        # A row that sees no key has lse = -inf, where finite differences are NaN; its gradient through
        # lse is checked to be ignored elsewhere (test_masking.py).
        return out, lse.masked_fill(torch.isinf(lse), 0.0)

    return f, tuple(inp.leaves().values())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradcheck(case):
    f, leaves = _attention_of_leaves(make_inputs(case, torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("algorithm", CPU_BACKWARD_ALGORITHMS)
def test_gradcheck_multi_tile(algorithm, monkeypatch):
    set_cpu_backward(monkeypatch, algorithm)  # every CPU backward algorithm
    f, leaves = _attention_of_leaves(make_inputs(MULTI_TILE, torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(f, leaves, fast_mode=True)
