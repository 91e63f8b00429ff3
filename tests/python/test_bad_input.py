"""Every wrong call of SPEC §5 raises a RuntimeError whose message names the argument and what was
expected — and the process carries on (these all run in one process)."""
import math

import pytest
import torch

import relattn

B, H, Hk, Lq, Lk, D, Dv, R = 2, 4, 2, 5, 6, 8, 4, 5
CLIP = torch.arange(R)  # clip buckets with M = 2: ids 0..4


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def good_args():
    """A valid call with every feature on; each bad case below changes one thing."""
    return dict(q=randn(B, H, Lq, D), k=randn(B, Hk, Lk, D), v=randn(B, Hk, Lk, Dv), rel_k=randn(R, D),
                rel_v=randn(H, R, Dv), rel_bias=randn(H, R), buckets=CLIP, alibi_slopes=relattn.alibi_slopes(H),
                key_padding_mask=torch.zeros(B, Lk, dtype=torch.bool), causal=True, q_offset=1)


def call(requires_grad=False, **changes):
    args = good_args()
    args.update(changes)
    args = {n: a for n, a in args.items() if a is not None}
    if requires_grad:
        args = {n: a.detach().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a
                for n, a in args.items()}
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    return relattn.attention(q, k, v, **args)


def test_good_args_are_good():
    assert call().shape == (B, H, Lq, Dv)


BAD = [
    # Wrong rank.
    ("q_rank_3", dict(q=randn(H, Lq, D)), r"q must be 4-D \[B, H, Lq, D\], got shape \[4, 5, 8\]"),
    ("q_rank_5", dict(q=randn(1, B, H, Lq, D)), r"q must be 4-D"),
    ("k_rank_3", dict(k=randn(B, Hk, Lk)), r"k must be 4-D \[B, Hk, Lk, D\]"),
    ("v_rank_5", dict(v=randn(B, Hk, Lk, Dv, 1)), r"v must be 4-D \[B, Hk, Lk, Dv\]"),
    ("rel_k_rank_1", dict(rel_k=randn(D)), r"rel_k must be \[R, D\] or \[H, R, D\], got shape \[8\]"),
    ("rel_k_rank_4", dict(rel_k=randn(1, H, R, D)), r"rel_k must be \[R, D\] or \[H, R, D\]"),
    ("rel_v_rank_1", dict(rel_v=randn(Dv)), r"rel_v must be \[R, Dv\] or \[H, R, Dv\]"),
    ("rel_bias_rank_1", dict(rel_bias=randn(R)), r"rel_bias must be \[H, R\]"),
    ("rel_bias_rank_3", dict(rel_bias=randn(H, R, 1)), r"rel_bias must be \[H, R\]"),
    # Mismatched sizes.
    ("B_of_k", dict(k=randn(B + 1, Hk, Lk, D)), r"batch sizes differ"),
    ("B_of_v", dict(v=randn(B + 1, Hk, Lk, Dv)), r"batch sizes differ"),
    ("D_of_k", dict(k=randn(B, Hk, Lk, D + 1)), r"k's head dim must equal q's \(D = 8\)"),
    ("Hk_of_v", dict(v=randn(B, Hk + 1, Lk, Dv)), r"v must be \[B, Hk, Lk, Dv\] with k's Hk and Lk"),
    ("Lk_of_v", dict(v=randn(B, Hk, Lk + 1, Dv)), r"v must be \[B, Hk, Lk, Dv\] with k's Hk and Lk"),
    ("H_not_multiple_of_Hk", dict(k=randn(B, 3, Lk, D), v=randn(B, 3, Lk, Dv)),
     r"H = 4 must be a multiple of the number of kv heads Hk = 3"),
    ("Hk_0_with_H_4", dict(k=randn(B, 0, Lk, D), v=randn(B, 0, Lk, Dv)), r"multiple of .* Hk = 0"),
    ("D_of_rel_k", dict(rel_k=randn(R, D + 1)), r"rel_k's last dim must equal D = 8"),
    ("Dv_of_rel_v", dict(rel_v=randn(R, D)), r"rel_v's last dim must equal Dv = 4"),
    ("H_of_per_head_rel_k", dict(rel_k=randn(H + 1, R, D)), r"per-head rel_k must have H = 4 heads"),
    ("H_of_per_head_rel_v", dict(rel_v=randn(Hk, R, Dv)), r"per-head rel_v must have H = 4 heads"),
    ("H_of_rel_bias", dict(rel_bias=randn(H - 1, R)), r"rel_bias must be \[H, R\] with H = 4"),
    ("R_of_rel_v", dict(rel_v=randn(R + 2, Dv)), r"bucket dimension R differs: rel_k has R = 5, rel_v has R = 7"),
    ("R_of_rel_bias", dict(rel_bias=randn(H, R + 1)), r"bucket dimension R differs: .*rel_bias has R = 6"),
    ("H_of_alibi_slopes", dict(alibi_slopes=randn(H + 1)), r"alibi_slopes must be \[H\] with H = 4"),
    ("rank_of_alibi_slopes", dict(alibi_slopes=randn(1, H)), r"alibi_slopes must be \[H\]"),
    ("Lk_of_key_padding_mask", dict(key_padding_mask=torch.zeros(B, Lk + 1, dtype=torch.bool)),
     r"key_padding_mask must be \[B, Lk\] = \[2, 6\], got shape \[2, 7\]"),
    ("B_of_key_padding_mask", dict(key_padding_mask=torch.zeros(B + 1, Lk, dtype=torch.bool)),
     r"key_padding_mask must be \[B, Lk\]"),
    ("rank_of_key_padding_mask", dict(key_padding_mask=torch.zeros(B, 1, Lk, dtype=torch.bool)),
     r"key_padding_mask must be \[B, Lk\]"),
    # Wrong dtypes.
    ("int_q", dict(q=torch.ones(B, H, Lq, D, dtype=torch.int32)), r"q must be float64, float32, float16 or bfloat16"),
    ("all_int_qkv", dict(q=torch.ones(B, H, Lq, D, dtype=torch.int64), k=torch.ones(B, Hk, Lk, D, dtype=torch.int64),
                         v=torch.ones(B, Hk, Lk, Dv, dtype=torch.int64)), r"q must be float64, float32"),
    ("k_dtype_differs", dict(k=randn(B, Hk, Lk, D, dtype=torch.float64)), r"q, k and v must share one dtype"),
    ("v_dtype_differs", dict(v=randn(B, Hk, Lk, Dv, dtype=torch.float16)), r"q, k and v must share one dtype"),
    ("float64_rel_k_beside_float32_q", dict(rel_k=randn(R, D, dtype=torch.float64)),
     r"rel_k must have q's dtype \(Float\) or float32, got Double"),
    ("float16_rel_v_beside_float32_q", dict(rel_v=randn(R, Dv, dtype=torch.float16)), r"rel_v must have q's dtype"),
    ("float64_rel_bias_beside_float32_q", dict(rel_bias=randn(H, R, dtype=torch.float64)),
     r"rel_bias must have q's dtype"),
    ("float64_alibi_beside_float32_q", dict(alibi_slopes=randn(H, dtype=torch.float64)),
     r"alibi_slopes must have q's dtype"),
    ("int_rel_k", dict(rel_k=torch.ones(R, D, dtype=torch.int64)), r"rel_k must have q's dtype"),
    ("float_buckets", dict(buckets=CLIP.float()), r"buckets must have an integer dtype, got Float"),
    ("bool_buckets", dict(buckets=torch.ones(R, dtype=torch.bool)), r"buckets must have an integer dtype"),
    ("float_rel_index", dict(buckets=None, rel_index=torch.zeros(Lq, Lk)), r"rel_index must have an integer dtype"),
    ("uint8_key_padding_mask", dict(key_padding_mask=torch.zeros(B, Lk, dtype=torch.uint8)),
     r"key_padding_mask must be bool, got Byte"),
    ("float_key_padding_mask", dict(key_padding_mask=torch.zeros(B, Lk)), r"key_padding_mask must be bool"),
    # Bucket sources.
    ("rel_k_without_buckets", dict(buckets=None, rel_v=None, rel_bias=None), r"need buckets or rel_index"),
    ("rel_bias_without_buckets", dict(buckets=None, rel_k=None, rel_v=None), r"need buckets or rel_index"),
    ("buckets_and_rel_index", dict(rel_index=torch.zeros(Lq, Lk, dtype=torch.long)),
     r"buckets and rel_index exclude each other"),
    ("even_length_buckets", dict(buckets=torch.arange(R - 1)), r"buckets must be 1-D of odd length 2M\+1"),
    ("2d_buckets", dict(buckets=CLIP.view(1, R)), r"buckets must be 1-D of odd length"),
    ("negative_bucket_id", dict(buckets=torch.tensor([0, -1, 2])), r"buckets holds bucket ids in \[-1, 2\].*R = 5"),
    ("bucket_id_R", dict(buckets=torch.tensor([0, 1, 5])),
     r"buckets holds bucket ids in \[0, 5\].*\[0, R\) with R = 5"),
    ("negative_rel_index", dict(buckets=None, rel_index=torch.full((Lq, Lk), -3)),
     r"rel_index holds bucket ids in \[-3"),
    ("rel_index_id_R", dict(buckets=None, rel_index=torch.full((B, Lq, Lk), R, dtype=torch.int32)),
     r"rel_index holds bucket ids in \[5, 5\].*R = 5"),
    ("rel_index_one_id_too_large", dict(buckets=None, rel_index=torch.eye(Lq, Lk, dtype=torch.long) * 100),
     r"rel_index holds bucket ids in \[0, 100\]"),
    ("rel_index_Lk", dict(buckets=None, rel_index=torch.zeros(Lq, Lk + 1, dtype=torch.long)),
     r"rel_index must be \[Lq, Lk\] = \[5, 6\] or \[B, Lq, Lk\] = \[2, 5, 6\], got shape \[5, 7\]"),
    ("rel_index_B", dict(buckets=None, rel_index=torch.zeros(B + 1, Lq, Lk, dtype=torch.long)),
     r"rel_index must be \[Lq, Lk\]"),
    ("rel_index_transposed", dict(buckets=None, rel_index=torch.zeros(Lk, Lq, dtype=torch.long)),
     r"rel_index must be \[Lq, Lk\]"),
    ("rel_index_rank_1", dict(buckets=None, rel_index=torch.zeros(Lq * Lk, dtype=torch.long)),
     r"rel_index must be \[Lq, Lk\]"),
    # Other arguments.
    ("nan_scale", dict(scale=math.nan), r"scale must be finite"),
    ("inf_scale", dict(scale=math.inf), r"scale must be finite"),
]


@pytest.mark.parametrize("changes,match", [pytest.param(c, m, id=i) for i, c, m in BAD])
def test_bad_input_raises(changes, match):
    with pytest.raises(RuntimeError, match=match):
        call(**changes)


@pytest.mark.parametrize("changes,match", [pytest.param(c, m, id=i) for i, c, m in BAD[::4]])
def test_bad_input_raises_with_grad(changes, match):
    # The same checks guard the autograd path.
    with pytest.raises(RuntimeError, match=match):
        call(requires_grad=True, **changes)


def test_bad_backward_arguments():
    args = good_args()
    q, k, v = args["q"], args["k"], args["v"]
    rest = (args["rel_k"], args["rel_v"], args["rel_bias"], args["buckets"], None, args["alibi_slopes"],
            args["key_padding_mask"], True, None, 1)
    out, lse = torch.ops.relattn.attention_forward(q, k, v, *rest)
    backward = torch.ops.relattn.attention_backward
    with pytest.raises(RuntimeError, match=r"grad_out must be Float of shape \[2, 4, 5, 4\]"):
        backward(torch.ones(B, H, Lq, Dv + 1), None, q, k, v, out, lse, *rest)
    with pytest.raises(RuntimeError, match=r"grad_out must be Float"):
        backward(torch.ones(B, H, Lq, Dv, dtype=torch.float64), None, q, k, v, out, lse, *rest)
    with pytest.raises(RuntimeError, match=r"out must be Float of shape"):
        backward(torch.ones_like(out), None, q, k, v, out[:, :, :-1], lse, *rest)
    with pytest.raises(RuntimeError, match=r"lse must have shape \[2, 4, 5\]"):
        backward(torch.ones_like(out), None, q, k, v, out, lse[..., :-1], *rest)
    with pytest.raises(RuntimeError, match=r"grad_lse must have shape \[2, 4, 5\]"):
        backward(torch.ones_like(out), torch.ones(B, H), q, k, v, out, lse, *rest)


@pytest.mark.parametrize("value", ["0", "three", "", "5000", "2x"])
def test_bad_cpu_backward_chunks(value, monkeypatch):
    monkeypatch.setenv("RELATTN_CPU_BACKWARD_CHUNKS", value)
    out = call(requires_grad=True)
    with pytest.raises(RuntimeError, match=r"RELATTN_CPU_BACKWARD_CHUNKS must be an integer in \[1, 4096\], got '"):
        out.sum().backward()


def test_bad_cpu_backward_algorithm(monkeypatch):
    monkeypatch.setenv("RELATTN_CPU_BACKWARD", "fast")
    out = call(requires_grad=True)
    with pytest.raises(RuntimeError, match=r"RELATTN_CPU_BACKWARD must be auto, fused or two-pass, got 'fast'"):
        out.sum().backward()


# Python arguments of the wrong type: a TypeError naming the argument, never a silent conversion (a float
# q_offset truncated, a string causal read as True) or an error that names nothing.
BAD_TYPES = [
    ("v_list", dict(v=[[1.0]]), r"v must be a torch.Tensor, got list"),
    ("float_q_offset", dict(q_offset=2.9), r"q_offset must be an int or an integer tensor, got float"),
    ("bool_q_offset", dict(q_offset=True), r"q_offset must be an int or an integer tensor, got bool"),
    ("str_causal", dict(causal="no"), r"causal must be a bool, got str"),
    ("int_causal", dict(causal=1), r"causal must be a bool, got int"),
]


@pytest.mark.parametrize("changes,match", [pytest.param(c, m, id=i) for i, c, m in BAD_TYPES])
def test_bad_argument_types_raise(changes, match):
    with pytest.raises(TypeError, match=match):
        call(**changes)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_none_for_q_k_or_v(which):
    qkv = [good_args()[n] for n in "qkv"]
    qkv[which] = None
    with pytest.raises(TypeError, match=rf"{'qkv'[which]} must be a torch.Tensor, got NoneType"):
        relattn.attention(*qkv)


def test_q_offset_beyond_int64():
    with pytest.raises(ValueError, match=r"q_offset must fit in int64, got 9223372036854775808"):
        call(q_offset=2**63)
    # Within int64 but so large that positions i + q_offset would overflow (was a silently wrong answer).
    for bad in (2**63 - 1, 2**62 + 1, -2**62 - 1, -2**63):
        with pytest.raises(RuntimeError, match=rf"q_offset must lie in \[-2\^62, 2\^62\].*got {bad}"):
            call(q_offset=bad)
    args = good_args()
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    args.update(causal=False, key_padding_mask=None)
    edge = relattn.attention(q, k, v, **{**args, "q_offset": 2**62})  # every pair in the far bucket
    torch.testing.assert_close(edge, relattn.attention(q, k, v, **{**args, "q_offset": 2**62 - 5}), rtol=0, atol=0)
    assert edge.isfinite().all()


def test_numpy_int_q_offset_is_an_int():
    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    got = call(q_offset=np.int64(1))
    torch.manual_seed(0)
    torch.testing.assert_close(got, call(q_offset=1), rtol=0, atol=0)


def test_segment_ids_of_another_batch_size():
    # Named as the caller passed it ([B, Lk]), not as the query ids the op derives from it.
    with pytest.raises(ValueError, match=r"segment_ids must be \[B, Lk\] = \[2, 6\], got shape \(3, 6\)"):
        call(segment_ids=torch.zeros(B + 1, Lk, dtype=torch.int32))


@pytest.mark.parametrize("p", [0.0, 1e-6, 0.1])
def test_malformed_dropout_seed(p):
    # Checked whenever given, also where p rounds to dropping nothing.
    with pytest.raises(RuntimeError, match=r"dropout_seed must be an int64 tensor of one element, got Float"):
        call(dropout_p=p, dropout_seed=torch.zeros(2))


@pytest.mark.parametrize("name", ["k", "v", "key_padding_mask", "rel_bias"])
def test_meta_beside_cpu(name):
    # A meta tensor beside CPU ones dispatches to the fake kernel, which must raise as the CPU op does
    # rather than hand back uninitialised memory.
    with pytest.raises(RuntimeError, match=rf"{name} is on meta but q is on cpu"):
        call(**{name: good_args()[name].to("meta")})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["k", "v", "rel_k", "rel_v", "rel_bias", "buckets", "alibi_slopes",
                                  "key_padding_mask"])
def test_device_mix(name):
    with pytest.raises(RuntimeError, match=rf"{name} is on cuda:0 but q is on cpu"):
        call(**{name: good_args()[name].cuda()})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mix_rel_index():
    with pytest.raises(RuntimeError, match=r"rel_index is on cuda:0 but q is on cpu"):
        call(buckets=None, rel_index=torch.zeros(Lq, Lk, dtype=torch.long, device="cuda"))


@pytest.mark.parametrize("helper,args,match", [
    pytest.param(relattn.clip_buckets, (-1,), r"clip_buckets: max_distance must be >= 0, got -1", id="clip_negative"),
    pytest.param(relattn.alibi_slopes, (0,), r"alibi_slopes: num_heads must be >= 1, got 0", id="alibi_zero"),
    pytest.param(relattn.alibi_slopes, (-4,), r"alibi_slopes: num_heads must be >= 1, got -4", id="alibi_negative"),
    pytest.param(relattn.t5_buckets, (2, 128, True), r"t5_buckets: num_buckets must be >= 4 when bidirectional",
                 id="t5_too_few_buckets_bidirectional"),
    pytest.param(relattn.t5_buckets, (1, 128, False), r"t5_buckets: num_buckets must be >= 2", id="t5_one_bucket"),
    pytest.param(relattn.t5_buckets, (-32, 128, True), r"t5_buckets: num_buckets must be >= 4",
                 id="t5_negative_buckets"),
    pytest.param(relattn.t5_buckets, (32, 8, True), r"t5_buckets: max_distance must exceed the 8 exact buckets",
                 id="t5_max_distance_too_small"),
    pytest.param(relattn.t5_buckets, (32, -128, True), r"t5_buckets: max_distance must exceed",
                 id="t5_negative_max_distance"),
])
def test_bad_helper_arguments(helper, args, match):
    with pytest.raises(RuntimeError, match=match):
        helper(*args)
