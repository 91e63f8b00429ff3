"""torch.library.opcheck on both ops: schema, autograd registration, fake (meta) kernels against the
real ones, and AOT dispatch with dynamic shapes (what torch.compile relies on)."""
import pytest
import torch

from cases import Case, case_id, make_grad_outputs, make_inputs

F32 = torch.float32

CASES = [
    (Case("plain", B=2, H=2, Lq=5, Lk=7, D=8), torch.float32),
    (Case("shaw_shared_clip_causal", rel_k="shared", rel_v="shared", positions="clip", M=2, causal=True,
          B=2, H=2, Lq=5, Lk=7, D=8, Dv=4), torch.float64),
    (Case("t5_bias_alibi_padding_gqa", rel_bias=True, positions="t5", t5=(8, 16, True), alibi=True,
          padding="random", q_offset=3, B=2, H=4, Hk=2, Lq=6, Lk=9, D=8), torch.float32),
    (Case("index3d_per_head_f32_tables_bf16", rel_k="per_head", rel_v="per_head", rel_bias=True,
          positions="index3d", R_index=5, table_dtype=F32, B=2, H=2, Hk=1, Lq=4, Lk=6, D=8, Dv=4),
     torch.bfloat16),
    (Case("fully_masked_rows", rel_bias=True, positions="index2d", causal=True, q_offset=-2, scale=0.5,
          B=1, H=2, Lq=5, Lk=5, D=8), torch.float16),
]


def _ids(param):
    return case_id(param) if isinstance(param, Case) else str(param)


@pytest.mark.parametrize("case,dtype", CASES, ids=_ids)
def test_opcheck_attention_forward(case, dtype):
    inp = make_inputs(case, dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.relattn.attention_forward.default, inp.op_args())


@pytest.mark.parametrize("case,dtype", CASES[1:4], ids=_ids)
def test_opcheck_attention_backward(case, dtype):
    inp = make_inputs(case.with_(grad_lse=True), dtype)
    args = inp.op_args()
    out, lse = torch.ops.relattn.attention_forward(*args)
    grad_out, grad_lse = make_grad_outputs(case.with_(grad_lse=True), dtype)
    torch.library.opcheck(torch.ops.relattn.attention_backward.default,
                          (grad_out, grad_lse, *args[:3], out, lse, *args[3:]))
