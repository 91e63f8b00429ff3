"""No host syncs on CUDA: the bucket-id checks (csrc/id_checks.h) and CUDA graph capture.

The range of `buckets` / `rel_index` (and the distance table's layout) must be read on the host, which on
CUDA waits for the stream. The binding reads each id tensor once per version (an in-place change is seen
and checked again), so steady-state calls do not sync, and while a stream is being captured into a CUDA
graph it reads nothing: the range check becomes a device-side assertion. Skipped without a GPU; the
cache itself is unit-tested on the CPU in tests/cpp/test_id_checks.cpp.
"""
import pytest
import torch

import relattn
from cases import HALF_DTYPES, Case, Inputs, assert_accurate, capture, case_id, gradients, make_grad_outputs, \
    make_inputs, run_reference
from test_cuda import HAS_CUDA, to_device

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and relattn built with its CUDA kernels")

GRAPH_CASES = [
    Case("shaw_clip_bias", rel_k="shared", rel_v="per_head", rel_bias=True, positions="clip", M=8, B=2, H=4,
         Lq=130, D=64),
    Case("t5_causal_gqa", rel_bias=True, positions="t5", causal=True, B=2, H=4, Hk=2, Lq=150, D=64),
    Case("index3d_padding", rel_k="shared", rel_v="shared", positions="index3d", R_index=9, padding="random",
         B=2, H=4, Lq=65, Lk=100, D=32),
]


def check_result(inp_cpu, dtype, grad_out, out, grads):
    """out and every gradient within SPEC §6 of the float64 reference on the same inputs."""
    ref_inp = inp_cpu.as_dtype(torch.float64)
    ref_out, ref_lse = run_reference(ref_inp, torch.float64)
    ref = {"out": ref_out, **gradients(ref_out, ref_lse, ref_inp.leaves(), grad_out, None)}
    naive = dict.fromkeys(ref)
    if dtype in HALF_DTYPES:
        low = inp_cpu.as_dtype(dtype)
        low_out, low_lse = run_reference(low, dtype)
        naive = {"out": low_out, **gradients(low_out, low_lse, low.leaves(), grad_out, None)}
    got = {"out": out, **grads}
    for name in ref:
        assert_accurate(name, got[name].detach().cpu(), ref[name], dtype, naive[name])


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", GRAPH_CASES, ids=case_id)
def test_cuda_graph_capture_forward_backward(case, dtype):
    """Forward and backward captured into one CUDA graph, then replayed on new inputs (q, k, v, tables and
    rel_index copied into the captured buffers): every result within SPEC §6 of the reference."""
    static = to_device(make_inputs(case, dtype, requires_grad=True), "cuda")
    leaves = static.leaves()
    grad_out_cpu = make_grad_outputs(case, dtype)[0]
    grad_out = grad_out_cpu.cuda()

    def step():
        out = relattn.attention(static.q, static.k, static.v, **static.kwargs)
        return out, torch.autograd.grad(out, list(leaves.values()), grad_out)

    graph, (captured_out, captured_grads) = capture(step)

    static_named = {"q": static.q, "k": static.k, "v": static.v, **static.kwargs}
    for seed in (1, 2):
        fresh = make_inputs(case, dtype, requires_grad=True, seed=seed)
        with torch.no_grad():
            for name, t in {"q": fresh.q, "k": fresh.k, "v": fresh.v, **fresh.kwargs}.items():
                if isinstance(t, torch.Tensor):
                    static_named[name].copy_(t)
        graph.replay()
        torch.cuda.synchronize()
        grads = dict(zip(leaves, captured_grads))
        check_result(fresh, dtype, grad_out_cpu, captured_out, grads)


def shaw_inputs(dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 70, 32, generator=g).to(dtype).cuda() for _ in range(3))
    rel_k = (0.5 * torch.randn(9, 32, generator=g)).to(dtype).cuda()
    rel_bias = torch.randn(4, 9, generator=g).to(dtype).cuda()
    return q, k, v, rel_k, rel_bias


def test_cuda_steady_state_calls_do_not_sync():
    """After the first call has read the ids, forward and backward with the same tensors raise no
    synchronizing CUDA operation; an in-place change of the ids is read (and synced) again."""
    q, k, v, rel_k, rel_bias = shaw_inputs()
    q.requires_grad_(True)
    rel_k.requires_grad_(True)
    buckets = relattn.clip_buckets(4, device="cuda")
    rel_index = torch.randint(0, 9, (70, 70), device="cuda")
    for kw in ({"buckets": buckets}, {"rel_index": rel_index}):
        relattn.attention(q, k, v, rel_k=rel_k, rel_bias=rel_bias, **kw).sum().backward()
        torch.cuda.synchronize()
        try:
            torch.cuda.set_sync_debug_mode("error")
            for _ in range(3):
                relattn.attention(q, k, v, rel_k=rel_k, rel_bias=rel_bias, **kw).sum().backward()
            ids = kw.get("buckets", kw.get("rel_index"))
            ids.view(-1)[0].fill_(0)  # in place: the version counter moves, the ids are read again
            with pytest.raises(RuntimeError, match="synchroniz"):
                relattn.attention(q, k, v, rel_k=rel_k, rel_bias=rel_bias, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("ids_dtype", (torch.int32, torch.int64), ids=str)
def test_cuda_segment_ids_do_not_sync_and_replay_in_a_graph(ids_dtype):
    """Segment ids are prepared on the device (sortedness, the per-row ranges, the int32 range check of
    int64 ids as a device assertion): no call synchronises, and a captured call follows new ids on replay."""
    q, k, v, rel_k, rel_bias = shaw_inputs()
    buckets = relattn.clip_buckets(4, device="cuda")
    ids = torch.zeros(2, 70, dtype=ids_dtype, device="cuda")
    ids[:, 30:] = 1
    relattn.attention(q, k, v, rel_k=rel_k, rel_bias=rel_bias, buckets=buckets, segment_ids=ids)  # reads buckets
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        relattn.attention(q, k, v, rel_k=rel_k, rel_bias=rel_bias, buckets=buckets, segment_ids=ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")

    def step():
        return relattn.attention(q, k, v, rel_k=rel_k, rel_bias=rel_bias, buckets=buckets, segment_ids=ids)

    graph, out = capture(step)
    for split in (10, 55):
        ids.zero_()
        ids[:, split:] = 1
        graph.replay()
        torch.cuda.synchronize()
        want = relattn.attention(q.cpu(), k.cpu(), v.cpu(), rel_k=rel_k.cpu(), rel_bias=rel_bias.cpu(),
                                 buckets=buckets.cpu(), segment_ids=ids.cpu())
        torch.testing.assert_close(out.cpu().float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("always", (False, True), ids=("cached", "always"))
def test_cuda_ids_changed_in_place_are_checked_again(always, monkeypatch):
    """A distance table or rel_index that was valid and is then changed in place: the new layout is used
    (the result matches the reference) and an out-of-range id still gets the clear error."""
    if always:
        monkeypatch.setenv("RELATTN_CHECK_IDS", "always")
    q, k, v, rel_k, rel_bias = shaw_inputs(torch.float32)
    buckets = relattn.clip_buckets(4, device="cuda")  # distinct ids: the kernels' fastest bucket sums
    rel_index = torch.randint(0, 9, (2, 70, 70), device="cuda")

    def check(**kw):
        out = relattn.attention(q, k, v, rel_k=rel_k, rel_bias=rel_bias, **kw)
        ref, _ = run_reference(Inputs(q, k, v, {"rel_k": rel_k, "rel_bias": rel_bias, **kw}), torch.float64)
        assert_accurate("out", out.cpu(), ref.cpu(), torch.float32)

    check(buckets=buckets)
    buckets[2] = 7  # [0, 1, 7, 3, 4, ...]: id 7 now appears twice, not consecutively
    check(buckets=buckets)
    buckets[0] = 9  # R = 9: out of range
    with pytest.raises(RuntimeError, match=r"buckets holds bucket ids in \[1, 9\]"):
        relattn.attention(q, k, v, rel_k=rel_k, rel_bias=rel_bias, buckets=buckets)

    check(rel_index=rel_index)
    rel_index[1, 5, 6] = -2
    with pytest.raises(RuntimeError, match=r"rel_index holds bucket ids in \[-2, 8\]"):
        relattn.attention(q, k, v, rel_k=rel_k, rel_bias=rel_bias, rel_index=rel_index)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_cuda_ids_written_behind_torchs_back_stay_in_bounds(dtype):
    """Ids changed where the version counter cannot see (through `.data`) after the one check: the kernels
    clamp what they read, so forward and backward finish without a memory error (a later synchronising
    call would raise it) and give finite results; RELATTN_CHECK_IDS=always would have caught them."""
    q, k, v, rel_k, rel_bias = shaw_inputs(dtype)
    rel_v = (0.5 * torch.randn(9, 32)).to(dtype).cuda()
    for t in (q, k, v, rel_k, rel_v, rel_bias):
        t.requires_grad_(True)
    buckets = relattn.clip_buckets(4, device="cuda")
    rel_index = torch.randint(0, 9, (2, 70, 70), device="cuda", dtype=torch.int32)
    for kw, ids in (({"buckets": buckets}, buckets), ({"rel_index": rel_index}, rel_index)):
        relattn.attention(q, k, v, rel_k=rel_k, rel_v=rel_v, rel_bias=rel_bias, **kw)  # checked and cached
        flat = ids.data.view(-1)
        version = ids._version
        for at, bad in ((0, 9), (flat.numel() // 2, -1), (flat.numel() - 1, 2**31 - 1), (7, -2**31)):
            flat[at] = bad
        assert ids._version == version  # the binding has no way to know
        out = relattn.attention(q, k, v, rel_k=rel_k, rel_v=rel_v, rel_bias=rel_bias, **kw)
        out.float().square().sum().backward()
        torch.cuda.synchronize()  # an illegal address would surface here
        assert torch.isfinite(out).all()
        for t in (q, k, v, rel_k, rel_v, rel_bias):
            assert torch.isfinite(t.grad).all()
            t.grad = None


@pytest.mark.parametrize("position", ("shaw", "t5"))
def test_cuda_compile_with_cuda_graphs_trains_like_eager(position):
    """torch.compile(backend="cudagraphs") — the CUDA-graph part of mode="reduce-overhead", without
    Inductor's code generation: a relative-position layer's loss and gradients over a few steps (fresh
    inputs each step, replays after the first) match the same layer run eagerly."""
    torch.manual_seed(0)
    eager = relattn.nn.RelativeMultiheadAttention(64, 4, position=position, max_distance=16, device="cuda")
    compiled_layer = relattn.nn.RelativeMultiheadAttention(64, 4, position=position, max_distance=16,
                                                           device="cuda")
    compiled_layer.load_state_dict(eager.state_dict())

    def loss_of(layer, x):
        return layer(x)[0].square().mean()

    compiled = torch.compile(loss_of, backend="cudagraphs", fullgraph=True)
    for step in range(4):
        x = torch.randn(2, 50, 64, device="cuda")
        expected = loss_of(eager, x)
        expected.backward()
        got = compiled(compiled_layer, x.clone())
        got.backward()
        torch.testing.assert_close(got.detach(), expected.detach(), rtol=1e-5, atol=1e-6, msg=f"loss, step {step}")
        for (name, p_e), p_c in zip(eager.named_parameters(), compiled_layer.parameters()):
            torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-4, atol=1e-6, msg=f"d{name}, step {step}")
            p_e.grad = p_c.grad = None


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_cuda_graph_capture_with_dropout_draws_a_new_mask_per_replay(dtype):
    """The dropout seed is drawn by a torch RNG op inside the graph (graph-safe: the generator's offset
    advances per replay), so every replay drops other weights; each replay's output equals an eager call
    with that replay's seed."""
    case = GRAPH_CASES[0]
    static = to_device(make_inputs(case, dtype), "cuda")
    seeds = []

    def step():
        seed = relattn.draw_dropout_seed(static.q)
        out = relattn.attention(static.q, static.k, static.v, **static.kwargs, dropout_p=0.3, dropout_seed=seed)
        return seed, out

    graph, (seed, out) = capture(step)
    outs = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        seeds.append(seed.clone())
        outs.append(out.clone())
    assert seeds[0].item() != seeds[1].item()
    assert not torch.equal(outs[0], outs[1])
    for s, o in zip(seeds, outs):
        eager = relattn.attention(static.q, static.k, static.v, **static.kwargs, dropout_p=0.3, dropout_seed=s)
        assert torch.equal(o, eager)
