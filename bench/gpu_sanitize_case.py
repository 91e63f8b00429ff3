"""Small CUDA forward and backward calls that touch every code path, for compute-sanitizer (memcheck,
racecheck, ...):

    compute-sanitizer --tool memcheck --error-exitcode 9 python3 bench/gpu_sanitize_case.py [--forward-only]

Each call is tiny (a few CTAs) so that the sanitizers finish in seconds. Forward, covered: the tensor-core
kernel at every padded head dim, fp16 and bf16, tile tails, causal + q_offset, key padding, GQA, ALiBi, the
distance-table window and the single-bucket rows, rel_index, per-row tables in shared memory and in global
scratch, misaligned/strided inputs (element-wise loads), D != Dv, and the SIMT kernel in float32, float64
and (forced) bf16, and calls with attention-weight dropout, with segment ids (sorted and not), with
per-batch query offsets and with split keys (flash-decoding: chosen by the binding and forced).

Backward (loss through out and lse; gradients of q, k, v and every table): every bf16 call (tensor-core
kernels at every padded head dim, hd=256 included, rel_index with MQA, global tables, misaligned inputs),
every float32 call (SIMT kernels, rel_index included) and the SIMT-forced bf16 call; fp16 and float64 run
the same kernel templates and stay forward-only to keep racecheck short. Rows that see no key get a
non-zero grad_lse (the op must ignore it). Last, ids made invalid behind the binding's back (through
`.data`, after the one check of the tensor): the kernels clamp them. Exits non-zero if a result or a
gradient is not finite.
"""
import os
import sys

import torch

import relattn

BACKWARD_DTYPES = (torch.bfloat16, torch.float32)
_backward = True
_calls = 0


def call(dtype, B=1, H=2, Hk=None, Lq=70, Lk=90, D=64, Dv=None, R=9, positions="clip", tables=("k", "v", "b"),
         alibi=False, padding=False, causal=False, q_offset=0, misaligned=False, seed=0, backward=None,
         unchecked_ids=False, dropout_p=0.0, segments=None, q_offsets=None):
    global _calls
    _calls += 1
    # One flushed line per call: a sanitizer run cut by its time limit still shows how far it got.
    print(f"gpu_sanitize_case: call {_calls}: {dtype} B={B} H={H} Hk={Hk} Lq={Lq} Lk={Lk} D={D} Dv={Dv} R={R} "
          f"positions={positions} tables={''.join(tables)} alibi={alibi} padding={padding} causal={causal} "
          f"q_offset={q_offset} misaligned={misaligned} dropout_p={dropout_p} segments={segments} "
          f"q_offsets={q_offsets} unchecked_ids={unchecked_ids} splits={os.environ.get('RELATTN_CUDA_SPLITS', '-')} "
          f"tables_env={os.environ.get('RELATTN_CUDA_TABLES', '-')} "
          f"kernel={os.environ.get('RELATTN_CUDA_KERNEL', '-')}",
          flush=True)
    g = torch.Generator(device="cuda").manual_seed(seed)
    Hk = Hk or H
    Dv = Dv or D
    if backward is None:
        backward = dtype in BACKWARD_DTYPES
    backward = backward and _backward

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, device="cuda").to(dt)

    if misaligned:
        q = randn(B, H, Lq, D + 1)[..., 1:]
    else:
        q = randn(B, H, Lq, D)
    k, v = randn(B, Hk, Lk, D), randn(B, Hk, Lk, Dv)
    kw = dict(causal=causal, q_offset=q_offset)
    if q_offsets is not None:  # per-batch offsets, read by the kernels from device memory
        kw["q_offset"] = torch.tensor(q_offsets, dtype=torch.int32, device="cuda")
    if dropout_p:
        kw["dropout_p"] = dropout_p  # the seed is drawn on the device
    if segments == "packed":  # sorted ids: tile ranges from the per-row spans, boundaries inside tiles
        ids = torch.zeros(B, Lk, dtype=torch.int32, device="cuda")
        for cut in (3, Lk // 3, Lk // 3 + 1, 2 * Lk // 3):
            ids[:, cut:] += 1
        kw["segment_ids"] = (ids[:, q_offset:q_offset + Lq], ids) if Lq + q_offset <= Lk else None
    elif segments == "unsorted":
        kw["segment_ids"] = (torch.randint(0, 3, (B, Lq), generator=g, device="cuda"),
                             torch.randint(0, 3, (B, Lk), generator=g, device="cuda"))
    if positions == "clip":
        kw["buckets"] = relattn.clip_buckets((R - 1) // 2).cuda()
    elif positions == "index":
        kw["rel_index"] = torch.randint(0, R, (B, Lq, Lk), generator=g, device="cuda")
    if "k" in tables:
        kw["rel_k"] = randn(R, D, dt=torch.float32)
    if "v" in tables:
        kw["rel_v"] = randn(H, R, Dv, dt=torch.float32)
    if "b" in tables:
        kw["rel_bias"] = randn(H, R, dt=torch.float32)
    if alibi:
        kw["alibi_slopes"] = relattn.alibi_slopes(H).cuda()
    if padding:
        kw["key_padding_mask"] = torch.rand(B, Lk, generator=g, device="cuda") < 0.3
        if padding == "last_batch":
            kw["key_padding_mask"][-1] = True
    if unchecked_ids:
        # Ids out of range written where the version counter cannot see them (.data), after one checked
        # call: the kernels must clamp them (never an access outside the tables; memcheck would report it).
        relattn.attention(q, k, v, **kw)
        # (A distance table keeps its two far entries apart from the window's: two window ids clamped to
        # one would break the "distinct" layout the binding read, and the fast bucket sums would race on
        # it — a wrong answer racecheck would report. rel_index takes the lanes' turns: anything goes.)
        ids = kw.get("buckets", kw.get("rel_index")).data.view(-1)
        bad = [(0, R), (ids.numel() - 1, -1)]
        if positions == "index":
            bad += [(ids.numel() // 2, 2**31 - 1), (1, -2**31)]
        for at, value in bad:
            ids[at] = value
    leaves = [t for t in (q, k, v, kw.get("rel_k"), kw.get("rel_v"), kw.get("rel_bias")) if t is not None]
    if backward:
        for t in leaves:
            t.requires_grad_()
    out, lse = relattn.attention(q, k, v, **kw, return_lse=True)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "NaN in the result"
    if backward:
        grad_out = randn(*out.shape)
        grad_lse = torch.randn(lse.shape, generator=g, device="cuda", dtype=lse.dtype)
        grads = torch.autograd.grad([out, lse], leaves, [grad_out, grad_lse])
        torch.cuda.synchronize()
        names = ["q", "k", "v"] + [n for n in ("rel_k", "rel_v", "rel_bias") if n in kw]
        for name, t in zip(names, grads):
            assert torch.isfinite(t).all(), f"non-finite d{name} ({dtype}, D={D}, Dv={Dv})"


def main(argv=None):
    global _backward
    argv = sys.argv[1:] if argv is None else argv
    _backward = "--forward-only" not in argv
    assert torch.cuda.is_available() and relattn.cuda_kernels_built()
    for dtype in (torch.bfloat16, torch.float16):
        for D in (32, 64, 96, 128, 256):
            call(dtype, D=D, Lq=70, Lk=90, alibi=True, padding=True, causal=True, q_offset=10)
        call(dtype, D=40, Dv=24, positions="index", R=7, Hk=1, H=2, padding=True)
        call(dtype, D=64, Lq=33, Lk=200, R=7, q_offset=-50)  # single-bucket rows on both sides
        call(dtype, D=64, misaligned=True, causal=True)
        for D in (96, 128):  # no relative tables: the plain forward instance (128-row tiles)
            call(dtype, D=D, Lq=150, Lk=90, positions="none", tables=(), alibi=True, padding=True, causal=True)
    # Interior tiles (no padding, not causal): whole-tile loads, no mask pass, the folded scale (plain
    # instance) and the far-warp path (table instance at hd 128; kernel B's far pairs).
    call(torch.bfloat16, D=128, Lq=150, Lk=300, positions="none", tables=())
    call(torch.bfloat16, D=128, Lq=70, Lk=300, R=9)
    # Rows that see no key (causal with a negative offset, and a fully padded batch): zero gradients, never NaN.
    call(torch.bfloat16, B=2, D=64, Lq=40, Lk=50, causal=True, q_offset=-8, padding="last_batch", Hk=1)
    os.environ["RELATTN_CUDA_TABLES"] = "global"
    call(torch.bfloat16, D=128, R=301, Lq=70, Lk=130, causal=True)
    call(torch.float32, D=64, R=301, Lq=20, Lk=40, alibi=True)
    del os.environ["RELATTN_CUDA_TABLES"]
    for dtype in (torch.float32, torch.float64):
        call(dtype, D=40, Dv=72, alibi=True, padding=True, causal=True, q_offset=5, Hk=1)
        call(dtype, D=64, positions="index", R=5)
    call(torch.float32, D=256, Dv=200, Lq=20, Lk=33, R=5, causal=True)  # SIMT at the largest head dim
    os.environ["RELATTN_CUDA_KERNEL"] = "simt"
    call(torch.bfloat16, D=48, Lq=20, Lk=40, alibi=True, padding=True)
    call(torch.bfloat16, D=256, Lq=20, Lk=40, positions="index", R=5, Hk=1)  # SIMT-forced hd=256, rel_index, MQA
    del os.environ["RELATTN_CUDA_KERNEL"]
    # Attention-weight dropout (every dtype on the SIMT kernels; the seed read from device memory).
    call(torch.bfloat16, D=64, Lq=40, Lk=70, alibi=True, padding=True, causal=True, q_offset=10, dropout_p=0.3)
    call(torch.float32, D=40, Dv=24, Lq=30, Lk=50, positions="index", R=7, Hk=1, dropout_p=0.5)
    # Segment ids (packed sequences): sorted (tile ranges) and unsorted (the per-pair test everywhere).
    call(torch.bfloat16, B=2, D=64, Lq=150, Lk=150, causal=True, segments="packed")
    call(torch.float16, B=2, D=128, Lq=70, Lk=90, positions="index", R=7, q_offset=10, segments="packed")
    call(torch.bfloat16, B=2, D=32, Lq=40, Lk=70, tables=(), padding=True, segments="unsorted")
    call(torch.float32, B=2, D=40, Lq=60, Lk=60, causal=True, segments="packed")
    # Per-batch query offsets (a [B] tensor): decode rows of a ragged batch (one row sees no key), the plain
    # instance, SIMT.
    call(torch.bfloat16, B=3, D=64, Lq=2, Lk=200, alibi=True, causal=True, q_offsets=[10, 198, -5])
    call(torch.bfloat16, B=2, D=128, Lq=70, Lk=130, positions="none", tables=(), causal=True, q_offsets=[0, 60])
    call(torch.float32, B=2, D=40, Dv=24, Lq=30, Lk=50, causal=True, q_offsets=[5, -10])
    # Split decode steps (key chunks merged by a second kernel): chosen by the binding (a long decode step of
    # one (batch, head) pair), and forced onto a ragged batch (chunks without keys), global tables, the plain
    # instance and SIMT.
    call(torch.bfloat16, H=1, D=64, Lq=1, Lk=1100, causal=True, q_offset=1099)
    os.environ["RELATTN_CUDA_SPLITS"] = "3"
    call(torch.bfloat16, B=3, D=64, Lq=2, Lk=200, alibi=True, causal=True, q_offsets=[10, 198, -5])
    os.environ["RELATTN_CUDA_TABLES"] = "global"
    call(torch.float16, D=128, R=301, Lq=3, Lk=300, padding="last_batch", B=2)
    del os.environ["RELATTN_CUDA_TABLES"]
    call(torch.bfloat16, D=32, Lq=5, Lk=200, positions="none", tables=(), causal=True, q_offset=195)
    call(torch.float32, D=40, Dv=24, Lq=4, Lk=200, causal=True, q_offset=196)
    del os.environ["RELATTN_CUDA_SPLITS"]
    # ids changed behind the binding's back (checked once per tensor version on CUDA): clamped in the kernels
    for dtype in (torch.bfloat16, torch.float32):
        call(dtype, D=64, Lq=40, Lk=60, unchecked_ids=True)
        call(dtype, D=64, Lq=40, Lk=60, positions="index", R=7, unchecked_ids=True)
    print(f"gpu_sanitize_case: all calls finished ({'forward and backward' if _backward else 'forward only'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
