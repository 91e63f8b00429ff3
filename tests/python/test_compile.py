"""relattn.attention under torch.compile(fullgraph=True), forward and backward, matches eager (SPEC §4)."""
import torch

import relattn
from cases import Case, gradients, make_grad_outputs, make_inputs

CASE = Case("compile", rel_k="per_head", rel_v="shared", rel_bias=True, positions="clip", M=3, alibi=True,
            padding="random", causal=True, q_offset=2, H=4, Hk=2, Lq=9, Lk=13, D=8, Dv=4, grad_lse=True)


def attention_block(q, k, v, rel_k, rel_v, rel_bias, buckets, alibi_slopes, key_padding_mask):
    # Some ordinary ops around the custom one, so that the graph is more than the op alone.
    out, lse = relattn.attention(q * 1.5, k, v.sin(), rel_k=rel_k, rel_v=rel_v, rel_bias=rel_bias, buckets=buckets,
                                 alibi_slopes=alibi_slopes, key_padding_mask=key_padding_mask, causal=True,
                                 q_offset=2, return_lse=True)
    return out.relu() + 1, lse * 2


def _args(inp):
    kw = inp.kwargs
    return (inp.q, inp.k, inp.v, kw["rel_k"], kw["rel_v"], kw["rel_bias"], kw["buckets"], kw["alibi_slopes"],
            kw["key_padding_mask"])


def _check_compiled_matches_eager(compiled, eager_fn=attention_block, dtype=torch.float32):
    inp = make_inputs(CASE, dtype, requires_grad=True)
    grad_out, grad_lse = make_grad_outputs(CASE, dtype)
    eager_out, eager_lse = eager_fn(*_args(inp))
    out, lse = compiled(*_args(inp))
    torch.testing.assert_close(out, eager_out)
    torch.testing.assert_close(lse, eager_lse)
    eager = gradients(eager_out, eager_lse, inp.leaves(), grad_out, grad_lse)
    got = gradients(out, lse, inp.leaves(), grad_out, grad_lse)
    for name in eager:
        torch.testing.assert_close(got[name], eager[name], msg=lambda m: f"d{name}: {m}")


def test_compile_aot_eager_fullgraph():
    torch._dynamo.reset()
    _check_compiled_matches_eager(torch.compile(attention_block, fullgraph=True, backend="aot_eager"))


def test_compile_aot_eager_dynamic_shapes():
    # dynamic=True traces with symbolic sizes: the fake kernels must compute shapes, not read them.
    torch._dynamo.reset()
    _check_compiled_matches_eager(torch.compile(attention_block, fullgraph=True, backend="aot_eager", dynamic=True))


def bare_attention(q, k, v, rel_k, rel_v, rel_bias, buckets, alibi_slopes, key_padding_mask):
    return relattn.attention(q, k, v, rel_k=rel_k, rel_v=rel_v, rel_bias=rel_bias, buckets=buckets,
                             alibi_slopes=alibi_slopes, key_padding_mask=key_padding_mask, causal=True,
                             q_offset=2, return_lse=True)


def test_compile_inductor_fullgraph():
    # The default backend. Just the op: each generated C++ kernel around it costs seconds of compile time
    # on a small CI machine, and the aot_eager tests already cover ops around it.
    torch._dynamo.reset()
    _check_compiled_matches_eager(torch.compile(bare_attention, fullgraph=True), bare_attention)
