"""GPU benchmark: relattn's CUDA forward and forward+backward vs the ways PyTorch users get that attention.

Shapes (bf16, each without and with causal masking):
    B4·H16·L4096·D128, B2·H16·L8192·D128, B8·H32·L2048·D64, B1·H16·L16384·D128
Modes: fwd (the forward alone) and fwdbwd (forward, then torch.autograd.grad of <out, grad_out> with respect
to q, k, v and every table that requires grad: a training step of the attention).

Positional schemes and implementations, forward:
    plain     relattn (no relative terms) | SDPA, flash backend | SDPA, default backend | relattn_tabinst,
              relattn with its plain kernel instance switched off (RELATTN_CUDA_PLAIN=0: the table
              instance's tiles; a tuning data point)
    t5        relattn (rel_bias + t5_buckets) | SDPA with the [1,H,L,L] float bias materialised per call
              (causal folded in as -inf) | FlexAttention score_mod (bias-table gather) | naive eager
    alibi     relattn (alibi_slopes) | FlexAttention score_mod
    shaw_k    relattn (rel_k + clip_buckets(32)) | FlexAttention score_mod gathering a precomputed
              scale·Q·Aᴷᵀ [B,H,L,R] (the precompute is timed too)
    shaw_kv   relattn (rel_k + rel_v + clip_buckets(32)) | relattn_gtab and relattn_stab, the same with its
              per-row tables forced into global / shared memory (RELATTN_CUDA_TABLES=global|smem; tuning data
              points: shared memory costs occupancy, 2 x 64 x 129 x 4 B at hd 128, which is why the default
              puts them in global memory there); nothing else computes the value term without an L×L×D tensor
Forward+backward (tables float32 and learnable, i.e. requires_grad; Shaw clipping k=64, R = 129):
    plain     SDPA, flash backend | relattn
    t5        relattn (learnable rel_bias) | FlexAttention with a score_mod reading the bias table, a parameter
              that requires grad (bias gradient on) | SDPA with the [1,H,L,L] bias materialised from the
              table per call, requiring grad | naive eager
    alibi     relattn | FlexAttention score_mod
    shaw_k    relattn (learnable rel_k) | FlexAttention gathering scale·Q·Aᴷᵀ computed per call (gradient to
              q and rel_k through it)
    shaw_kv   relattn (learnable rel_k and rel_v)
The targets (of the CUDA forward and backward issues), reported with ratio columns in bench.md:
    Shaw K+V (clip k=64) forward >= 0.7x SDPA-flash plain forward on B4·H16·L4096·D128;
    relattn with no positional terms, forward >= 0.85x SDPA-flash (same shape);
    Shaw K+V (clip k=64) forward+backward >= 0.6x SDPA-flash plain forward+backward on B4·H16·L4096·D128;
    learnable T5 bias forward+backward >= 1.5x FlexAttention's (speed, every shape measured).
The materialising baselines are skipped where they would not fit: naive eager and the materialised bias in
forward+backward when their estimated peak memory exceeds the free GPU memory, or past 2^31 score entries
(the L16384 shape). Any run that still runs out of memory is recorded as OOM.

TFLOP/s use FlashAttention's convention, 4·B·H·Lq·Lk·D per forward and 2.5x that per backward (3.5x for
forward+backward), halved for causal. Peak memory is the allocator's high-water mark above the inputs during
one call (forward+backward: including the gradients). Every run is checked against an independent float32
eager computation of the formula on a slice (batch 0, heads 0-1, every query and key): its out (fwdbwd: and
dq, dk, dv) sliced from the timed call, and the table gradients of the same implementation called on that
slice; `check` is the largest error relative to the reference's largest magnitude, and a run above
CHECK_TOL is marked MISMATCH and counts for no target (timing a wrong computation measures nothing). max_err
(and max_err_table, relative) compare the same slices with the scheme's first implementation. Times are
medians over repeated calls (CUDA events via triton.testing.do_bench when Triton is present). Runs go in
tiers: the runs the targets need, on their shape, first, then relattn and SDPA over every shape, then the
materialising baselines, then dropout, then FlexAttention (whose compiles are the slowest part; a run is
only started with FLEX_START_S seconds of the budget left); once --budget-s is spent, the rest are recorded
as skipped. A CUDA error that kills the context (an illegal address) ends the benchmark: the tables are
written with the remaining runs marked, and the script exits 3.

Kernel breakdown (last, with --profile-s seconds kept for it out of the budget): torch.profiler over a few calls
of relattn's forward (plain, Shaw K+V) and forward+backward (plain, Shaw K+V, T5) and SDPA-flash's on the
target shape, non-causal: the time per call of every GPU kernel (relattn's forward, its backward kernels A
and B, the table-gradient GEMMs, copies), as a table in bench.md — where the time goes, for tuning.

    python bench/gpu_bench.py [--out DIR] [--mode fwd|fwdbwd|both] [--shapes NAME ...] [--schemes ...]
                              [--budget-s 300] [--quick]
    python bench/gpu_bench.py --dry-run        # the plan only; no GPU needed

Writes DIR/bench.csv (one row per run, with commit, GPU and torch version), DIR/bench.md and DIR/bench.png.
"""
import argparse
import csv
import datetime
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {  # name: (B, H, L, D)
    "B4_H16_L4096_D128": (4, 16, 4096, 128),
    "B2_H16_L8192_D128": (2, 16, 8192, 128),
    "B8_H32_L2048_D64": (8, 32, 2048, 64),
    "B1_H16_L16384_D128": (1, 16, 16384, 128),
}
MODES = ("fwd", "fwdbwd")
# mode: [(scheme, impl)] in the order they run; the first impl of a scheme is its reference for max_err.
RUNS = {
    "fwd": [
        ("plain", "sdpa_flash"), ("plain", "relattn"), ("plain", "sdpa_default"), ("plain", "relattn_tabinst"),
        ("t5", "relattn"), ("alibi", "relattn"), ("shaw_k", "relattn"), ("shaw_kv", "relattn"),
        ("shaw_kv", "relattn_gtab"), ("shaw_kv", "relattn_stab"),
        ("t5", "sdpa_bias"), ("t5", "naive"),
        ("t5", "flex"), ("alibi", "flex"), ("shaw_k", "flex"),
    ],
    "fwdbwd": [
        ("plain", "sdpa_flash"), ("plain", "relattn"),
        ("t5", "relattn"), ("alibi", "relattn"), ("shaw_k", "relattn"), ("shaw_kv", "relattn"),
        ("t5", "sdpa_bias"), ("t5", "naive"),
        ("t5", "flex"), ("alibi", "flex"), ("shaw_k", "flex"),
        ("plain", "sdpa_flash_dropout"), ("shaw_kv", "relattn_dropout"),
    ],
}
SCHEMES = ("plain", "t5", "alibi", "shaw_k", "shaw_kv")
IMPLS = ("relattn", "relattn_gtab", "relattn_stab", "relattn_tabinst", "sdpa_flash", "sdpa_default", "sdpa_bias", "flex", "naive",
         "relattn_dropout", "sdpa_flash_dropout")
# Attention-weight dropout (training): p = 0.1. Outputs differ from the reference by the mask, so these rows
# get no max_err. relattn runs every dropout call on its SIMT kernels so far: the row measures that cost.
DROPOUT_P = 0.1
DROPOUT_IMPLS = ("relattn_dropout", "sdpa_flash_dropout")
# relattn's implementations: the binding's environment switch each sets (None: none).
RELATTN_ENV = {"relattn": None, "relattn_dropout": None, "relattn_gtab": ("RELATTN_CUDA_TABLES", "global"),
               "relattn_stab": ("RELATTN_CUDA_TABLES", "smem"), "relattn_tabinst": ("RELATTN_CUDA_PLAIN", "0")}
T5 = (32, 128, True)  # num_buckets, max_distance, bidirectional
CLIP_K = {"fwd": 64, "fwdbwd": 64}  # Shaw clipping distance per mode (k=64, R = 129: both targets' setting)
# The tables that are learnable (requires_grad) in fwdbwd, by scheme; q, k and v always are.
TRAINED_TABLES = {"plain": (), "t5": ("t5_bias",), "alibi": (), "shaw_k": ("rel_k",), "shaw_kv": ("rel_k", "rel_v")}
# Targets of the CUDA issues: (name, text, shape or None for every shape, scheme, impl, baseline scheme,
# baseline impl, needed speed ratio = baseline ms / relattn ms, mode).
TARGET_SHAPE = "B4_H16_L4096_D128"
TARGETS = [
    ("shaw_kv_fwd_vs_sdpa_flash", "Shaw K+V (clip k=64) forward >= 0.7x SDPA-flash plain forward on "
     "B4·H16·L4096·D128", TARGET_SHAPE, "shaw_kv", "relattn", "plain", "sdpa_flash", 0.7, "fwd"),
    ("plain_fwd_vs_sdpa_flash", "relattn with no positional terms, forward >= 0.85x SDPA-flash on "
     "B4·H16·L4096·D128", TARGET_SHAPE, "plain", "relattn", "plain", "sdpa_flash", 0.85, "fwd"),
    ("shaw_kv_vs_sdpa_flash", "Shaw K+V (clip k=64) forward+backward >= 0.6x SDPA-flash plain forward+backward "
     "on B4·H16·L4096·D128", TARGET_SHAPE, "shaw_kv", "relattn", "plain", "sdpa_flash", 0.6, "fwdbwd"),
    ("t5_vs_flex", "learnable T5 bias forward+backward >= 1.5x FlexAttention's (bias gradient on)", None, "t5",
     "relattn", "t5", "flex", 1.5, "fwdbwd"),
]
# Runs the targets need, on the target shape: they go first so that a short budget still measures them.
TARGET_RUNS = [("fwdbwd", "plain", "sdpa_flash"), ("fwdbwd", "shaw_kv", "relattn"), ("fwdbwd", "t5", "relattn"),
               ("fwdbwd", "t5", "flex"), ("fwd", "plain", "sdpa_flash"), ("fwd", "shaw_kv", "relattn"),
               ("fwd", "plain", "relattn")]
BWD_FACTOR = 2.5  # FlashAttention's convention: backward FLOPs = 2.5x forward
CSV_FIELDS = ["commit", "gpu", "torch", "date", "mode", "shape", "B", "H", "L", "D", "causal", "scheme", "impl",
              "ms", "tflops", "peak_mib", "check", "max_err", "max_err_table", "vs_sdpa_flash", "status"]
# The independent check: largest |result - float32 reference| / largest |reference| over out (fwdbwd: dq, dk,
# dv and the table gradients); bf16 inputs and outputs stay well below it (about 1e-2 at these shapes).
CHECK_TOL = 0.05
CHECK_HEADS = 2  # the check's slice: batch 0, heads [0, CHECK_HEADS)
FLEX_START_S = 60  # a FlexAttention run (a compile) starts only with this much of the budget left


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu"), help="output directory")
    ap.add_argument("--mode", choices=("fwd", "fwdbwd", "both"), default="both",
                    help="forward only, forward+backward, or both (default)")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    ap.add_argument("--impls", nargs="+", default=None, choices=list(IMPLS),
                    help="only these implementations (relattn_gtab, relattn_stab, relattn_tabinst and sdpa_default "
                         "run in fwd mode only)")
    ap.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="stop starting new runs after this many seconds (the rest are recorded as skipped)")
    ap.add_argument("--profile-s", type=float, default=25.0,
                    help="seconds of the budget kept for the kernel breakdown at the end (0: no breakdown)")
    ap.add_argument("--warmup-ms", type=float, default=50.0)
    ap.add_argument("--rep-ms", type=float, default=300.0)
    ap.add_argument("--quick", action="store_true", help="first shape only, short timings")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes = args.shapes[:1]
        args.warmup_ms, args.rep_ms = 10.0, 50.0
    return args


def modes_of(args):
    return MODES if args.mode == "both" else (args.mode,)


def plan(args):
    """[(mode, shape_name, causal, scheme, impl)] in run order: the forward+backward targets on their shape
    first, then relattn and SDPA over every shape (forward, then forward+backward), then the materialising
    baselines, then dropout, then FlexAttention (whose compiles are the slowest part)."""
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    modes = modes_of(args)

    def wanted(scheme, impl):
        return scheme in args.schemes and (args.impls is None or impl in args.impls)
    out, seen = [], set()

    def add(run):
        if run not in seen:
            seen.add(run)
            out.append(run)
    if TARGET_SHAPE in args.shapes:
        for causal in causals:
            for mode, scheme, impl in TARGET_RUNS:
                if mode in modes and wanted(scheme, impl):
                    add((mode, TARGET_SHAPE, causal, scheme, impl))
    tiers = ({"relattn", "relattn_gtab", "relattn_stab", "relattn_tabinst", "sdpa_flash", "sdpa_default"},
             {"sdpa_bias", "naive"}, set(DROPOUT_IMPLS), {"flex"})
    for tier in tiers:
        for mode in modes:
            for shape in args.shapes:
                for causal in causals:
                    for scheme, impl in RUNS[mode]:
                        if impl in tier and wanted(scheme, impl):
                            add((mode, shape, causal, scheme, impl))
    return out


def flops(B, H, L, D, causal, mode="fwd"):
    """FlashAttention's convention: 4·B·H·L²·D per forward, 2.5x that per backward, halved for causal."""
    f = 4.0 * B * H * L * L * D
    if mode == "fwdbwd":
        f *= 1.0 + BWD_FACTOR
    return f / 2 if causal else f


def estimated_peak_bytes(mode, impl, B, H, L, D):
    """A rough upper estimate of the peak memory of the materialising baselines (None: O(L·D), no concern).
    fwdbwd naive: ~6 float32 B·H·L² tensors alive at once (scores, bias sum, masked copy, softmax saved for
    backward, their gradients); fwdbwd sdpa_bias: the gathered float32 [H,L,L] bias, its masked and bf16
    copies and their gradients, a [B,H,L,L] bias gradient, the [L,L] int64 bucket ids."""
    if mode != "fwdbwd":
        return None
    if impl == "naive":
        return 24 * B * H * L * L
    if impl == "sdpa_bias":
        return 18 * H * L * L + 2 * B * H * L * L + 9 * L * L
    return None


def skip_reason(mode, impl, B, H, L, D, free_bytes):
    """Why a run is not attempted (None: run it). Only the materialising baselines in fwdbwd are ever
    skipped: past 2^31 score entries (their time and memory) or when the estimate exceeds 85% of free memory."""
    est = estimated_peak_bytes(mode, impl, B, H, L, D)
    if est is None:
        return None
    entries = (B if impl == "naive" else 1) * H * L * L  # of the score (naive) or bias (sdpa_bias) tensors
    if entries > 2**31:
        return f"skipped (L={L}: {impl} fwd+bwd materialises {entries / 2**30:.0f}Gi-entry score/bias tensors)"
    if free_bytes is not None and est > 0.85 * free_bytes:
        return f"skipped (memory: needs ~{est / 2**30:.0f} GiB, {free_bytes / 2**30:.0f} GiB free)"
    return None


def commit_id():
    if os.environ.get("RELATTN_COMMIT"):  # set by bench/gpu_check.sh (the device copy may have no .git)
        return os.environ["RELATTN_COMMIT"]
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:
        return os.environ.get("RELATTN_COMMIT", "unknown")


# ---- the implementations --------------------------------------------------------------------------------

class Bench:
    def __init__(self, args, device="cuda"):
        import torch
        import relattn
        self.torch, self.relattn, self.args = torch, relattn, args
        self.device = device  # (the CPU for tests/python/test_gpu_bench.py)
        self.F = torch.nn.functional
        self._flex = None
        self._block_masks = {}

    def inputs(self, B, H, L, D):
        torch = self.torch
        g = torch.Generator(device=self.device).manual_seed(0)

        def randn(*shape, dtype=torch.bfloat16, std=1.0):
            return (torch.randn(*shape, generator=g, device=self.device) * std).to(dtype)

        x = dict(q=randn(B, H, L, D), k=randn(B, H, L, D), v=randn(B, H, L, D))
        x["t5_buckets"] = self.relattn.t5_buckets(*T5).to(self.device)
        x["t5_bias"] = randn(H, T5[0], dtype=torch.float32)
        x["slopes"] = self.relattn.alibi_slopes(H).to(self.device)
        x["grad_out"] = randn(B, H, L, D)
        for mode, clip_k in CLIP_K.items():  # the Shaw tables of each mode (clipping distance)
            x[f"clip_k:{mode}"] = clip_k
            x[f"clip_buckets:{mode}"] = self.relattn.clip_buckets(clip_k).to(self.device)
            x[f"rel_k:{mode}"] = randn(2 * clip_k + 1, D, dtype=torch.float32, std=0.5)
            x[f"rel_v:{mode}"] = randn(2 * clip_k + 1, D, dtype=torch.float32, std=0.5)
        return x

    def for_mode(self, x, mode):
        """The inputs one mode's implementations read: the Shaw tables of its clipping distance, and in
        fwdbwd q, k, v and the learnable tables as leaves that require grad (views of the same storage)."""
        y = {n: t for n, t in x.items() if ":" not in n}
        for n in ("clip_k", "clip_buckets", "rel_k", "rel_v"):
            y[n] = x[f"{n}:{mode}"]
        if mode == "fwdbwd":
            for n in ("q", "k", "v", "t5_bias", "rel_k", "rel_v"):
                y[n] = y[n].detach().requires_grad_()
        return y

    def train_fn(self, scheme, impl, x, causal):
        """A zero-argument callable computing forward+backward: (out, {name: gradient}) for q, k, v and the
        scheme's learnable tables (x from for_mode(..., "fwdbwd"))."""
        torch = self.torch
        forward = self.fn(scheme, impl, x, causal)
        names = ["q", "k", "v", *TRAINED_TABLES[scheme]]
        leaves = [x[n] for n in names]
        grad_out = x["grad_out"]

        def run():
            out = forward()
            grads = torch.autograd.grad(out, leaves, grad_out)
            return out, dict(zip(names, grads))
        return run

    def check_slice(self, x):
        """The check's inputs: batch 0 and heads [0, CHECK_HEADS) of x (inputs() layout), every query and key,
        with the per-head tables cut to those heads (the shared Shaw tables whole)."""
        y = dict(x)
        for n in ("q", "k", "v", "grad_out"):
            y[n] = x[n][:1, :CHECK_HEADS]
        y["t5_bias"], y["slopes"] = x["t5_bias"][:CHECK_HEADS], x["slopes"][:CHECK_HEADS]
        return y

    def reference(self, scheme, x, causal, mode):
        """The formula (SPEC §1) in float32, eager, on x (a check_slice after for_mode): {"out": ...} and in
        fwdbwd the gradients of q, k, v and the scheme's learnable tables for grad_out. The Shaw value term
        goes through bucket sums (Σ_{j: β=r} p_ij, then @ rel_v): nothing of size L×L×D."""
        torch = self.torch
        train = mode == "fwdbwd"
        names = ["q", "k", "v", *(TRAINED_TABLES[scheme] if train else ())]
        leaf = {n: x[n].detach().float().requires_grad_(train) for n in names}
        q, k, v = leaf["q"], leaf["k"], leaf["v"]
        H, L, D = q.shape[1], q.shape[2], q.shape[3]
        with torch.enable_grad() if train else torch.no_grad():
            s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
            if scheme == "t5":
                bias = leaf.get("t5_bias", x["t5_bias"].float())
                s = s + bias[:, self.pair_buckets(x["t5_buckets"], L)].unsqueeze(0)
            elif scheme == "alibi":
                i = torch.arange(L, device=self.device)
                s = s - x["slopes"].float().view(1, H, 1, 1) * (i.view(1, -1) - i.view(-1, 1)).abs()
            elif scheme in ("shaw_k", "shaw_kv"):
                idx = self.pair_buckets(x["clip_buckets"], L).expand(1, H, L, L)
                rel_k = leaf.get("rel_k", x["rel_k"].float())
                s = s + ((q @ rel_k.T) / math.sqrt(D)).gather(-1, idx)
            if causal:
                s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device=self.device).triu(1), float("-inf"))
            p = torch.softmax(s, dim=-1)
            del s
            out = p @ v
            if scheme == "shaw_kv":
                R = x["rel_v"].shape[0]
                sums = torch.zeros(1, H, L, R, device=self.device).scatter_add(-1, idx, p)
                out = out + sums @ leaf.get("rel_v", x["rel_v"].float())
            result = {"out": out.detach()}
            if train:
                grads = torch.autograd.grad(out, [leaf[n] for n in names], x["grad_out"].float())
                result.update({n: g for n, g in zip(names, grads)})
        return result

    def pair_buckets(self, table, L):
        torch = self.torch
        M = (table.numel() - 1) // 2
        i = torch.arange(L, device=self.device).view(-1, 1)
        j = torch.arange(L, device=self.device).view(1, -1)
        return table.long()[(j - i).clamp(-M, M) + M]  # [L, L]

    def flex(self):
        if self._flex is None:
            import torch._dynamo
            from torch.nn.attention.flex_attention import flex_attention
            # One compile per shape, causal, score_mod and grad mode: far more than dynamo's default of 8
            # recompiles, past which it would silently fall back to eager (unfused) flex_attention.
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
            self._flex = self.torch.compile(flex_attention, dynamic=False)
        return self._flex

    def block_mask(self, L, causal):
        if not causal:
            return None
        if L not in self._block_masks:
            from torch.nn.attention.flex_attention import create_block_mask

            def causal_mask(b, h, q_idx, kv_idx):
                return q_idx >= kv_idx
            self._block_masks[L] = create_block_mask(causal_mask, None, None, L, L, device=self.device)
        return self._block_masks[L]

    def fn(self, scheme, impl, x, causal):
        """A zero-argument callable computing the forward (x from for_mode)."""
        torch, F, ra = self.torch, self.F, self.relattn
        q, k, v = x["q"], x["k"], x["v"]
        L, D = q.shape[2], q.shape[3]
        scale = 1.0 / math.sqrt(D)
        if impl in RELATTN_ENV:
            kw = {"plain": {}, "t5": dict(rel_bias=x["t5_bias"], buckets=x["t5_buckets"]),
                  "alibi": dict(alibi_slopes=x["slopes"]),
                  "shaw_k": dict(rel_k=x["rel_k"], buckets=x["clip_buckets"]),
                  "shaw_kv": dict(rel_k=x["rel_k"], rel_v=x["rel_v"], buckets=x["clip_buckets"])}[scheme]
            if impl == "relattn":
                return lambda: ra.attention(q, k, v, causal=causal, **kw)
            if impl == "relattn_dropout":
                return lambda: ra.attention(q, k, v, causal=causal, dropout_p=DROPOUT_P, **kw)

            var, value = RELATTN_ENV[impl]

            def run():  # a tuning data point: the same call with a debug switch of the binding set
                os.environ[var] = value
                try:
                    return ra.attention(q, k, v, causal=causal, **kw)
                finally:
                    del os.environ[var]
            return run
        if impl == "sdpa_flash_dropout":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def run():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=DROPOUT_P)
            return run
        if impl in ("sdpa_flash", "sdpa_default"):
            from torch.nn.attention import SDPBackend, sdpa_kernel
            if impl == "sdpa_flash":
                def run():
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                return run
            return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        if impl == "sdpa_bias":
            assert scheme == "t5"

            def run():
                idx = self.pair_buckets(x["t5_buckets"], L)
                bias = x["t5_bias"][:, idx].unsqueeze(0)  # [1, H, L, L] float32
                if causal:
                    bias = bias.masked_fill(torch.ones(L, L, dtype=torch.bool, device=self.device).triu(1), float("-inf"))
                return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
            return run
        if impl == "naive":
            assert scheme == "t5"

            def run():
                s = (q @ k.transpose(-1, -2)).float() * scale
                s = s + x["t5_bias"][:, self.pair_buckets(x["t5_buckets"], L)].unsqueeze(0)
                if causal:
                    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device=self.device).triu(1), float("-inf"))
                return torch.softmax(s, dim=-1).to(q.dtype) @ v
            return run
        if impl == "flex":
            flex, bm = self.flex(), self.block_mask(L, causal)
            if scheme == "t5":
                table, bias = x["t5_buckets"].int(), x["t5_bias"]
                M = (table.numel() - 1) // 2

                def score_mod(score, b, h, q_idx, kv_idx):
                    d = (kv_idx - q_idx).clamp(-M, M) + M
                    return score + bias[h, table[d]]
                return lambda: flex(q, k, v, score_mod=score_mod, block_mask=bm)
            if scheme == "alibi":
                slopes = x["slopes"]

                def score_mod(score, b, h, q_idx, kv_idx):
                    return score - slopes[h] * (kv_idx - q_idx).abs()
                return lambda: flex(q, k, v, score_mod=score_mod, block_mask=bm)
            if scheme == "shaw_k":
                table, rel_k = x["clip_buckets"].int(), x["rel_k"]
                M = x["clip_k"]

                def run():
                    qa = (q.float() @ rel_k.T) * scale  # [B, H, L, R]

                    def score_mod(score, b, h, q_idx, kv_idx):
                        return score + qa[b, h, q_idx, table[(kv_idx - q_idx).clamp(-M, M) + M]]
                    return flex(q, k, v, score_mod=score_mod, block_mask=bm)
                return run
        raise ValueError(f"no implementation {impl} for scheme {scheme}")

    def time_ms(self, fn):
        torch = self.torch
        try:
            import triton.testing
            return float(triton.testing.do_bench(fn, warmup=self.args.warmup_ms, rep=self.args.rep_ms,
                                                 return_mode="median"))
        except ImportError:
            pass
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(3):
            fn()
        times = []
        deadline = time.time() + self.args.rep_ms / 1e3
        while time.time() < deadline or len(times) < 5:
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        times.sort()
        return times[len(times) // 2]


def _ms(r):
    try:
        return float(r["ms"]) if r.get("status") == "ok" else None
    except (KeyError, TypeError, ValueError):
        return None


def _find(rows, mode, shape, causal, scheme, impl):
    for r in rows:
        if (r["mode"], r["shape"], r["causal"], r["scheme"], r["impl"]) == (mode, shape, causal, scheme, impl):
            return r
    return None


def add_ratios(rows):
    """vs_sdpa_flash: SDPA-flash plain time / this run's time, same mode, shape and causal (>1: faster)."""
    for r in rows:
        base = _find(rows, r["mode"], r["shape"], r["causal"], "plain", "sdpa_flash")
        ms, base_ms = _ms(r), _ms(base) if base else None
        r["vs_sdpa_flash"] = f"{base_ms / ms:.2f}" if ms and base_ms else ""


def target_results(rows, shapes):
    """[(target, shape, causal, relattn ms, baseline ms, ratio or None, met or None, mismatch)] for every target
    (mismatch: either run failed its check, so it counts for nothing)."""
    out = []
    causals = sorted({r["causal"] for r in rows})
    for target in TARGETS:
        name, text, tshape, scheme, impl, bscheme, bimpl, need, mode = target
        for shape in ([tshape] if tshape else shapes):
            if shape not in shapes:
                continue
            for causal in causals:
                r = _find(rows, mode, shape, causal, scheme, impl)
                b = _find(rows, mode, shape, causal, bscheme, bimpl)
                if r is None and b is None:
                    continue
                ms, bms = _ms(r) if r else None, _ms(b) if b else None
                ratio = bms / ms if ms and bms else None
                mismatch = any(x is not None and str(x.get("status", "")).startswith("MISMATCH") for x in (r, b))
                out.append((target, shape, causal, ms, bms, ratio, None if ratio is None else ratio >= need, mismatch))
    return out


def target_lines(rows, shapes):
    results = target_results(rows, shapes)
    lines = ["## Targets (bf16)", ""]
    for target in TARGETS:
        name, text, _, scheme, impl, bscheme, bimpl, need, _ = target
        mine = [t for t in results if t[0] is target]
        measured = [t for t in mine if t[6] is not None]
        mismatch = any(m[6] is None and m[7] for m in mine)
        if not measured:
            verdict = "not measured" + (" (a MISMATCH: see check)" if mismatch else "")
        elif all(t[6] for t in measured):
            verdict = "MET" + ("" if len(measured) == len(mine) else " (where measured)")
        elif any(t[6] for t in measured):
            verdict = "partly met"
        else:
            verdict = "NOT met"
        lines.append(f"- **{text}**: {verdict} — ratio = {bimpl} ({bscheme}) ms / {impl} ({scheme}) ms, "
                     f"needed >= {need}")
    lines += ["", "| target | shape | causal | relattn ms | baseline | baseline ms | ratio | needed | met |",
              "|---|---|---|---:|---|---:|---:|---:|---|"]
    for target, shape, causal, ms, bms, ratio, met, mismatch in results:
        name, _, _, _, _, bscheme, bimpl, need, _ = target
        lines.append(f"| {name} | {shape} | {causal} | {'' if ms is None else f'{ms:.3f}'} | {bimpl} ({bscheme}) | "
                     f"{'' if bms is None else f'{bms:.3f}'} | {'' if ratio is None else f'{ratio:.2f}x'} | "
                     f"{need}x | {('MISMATCH' if mismatch else '-') if met is None else ('yes' if met else 'NO')} |")
    return lines


def write_reports(rows, out_dir, meta, plot=True):
    """bench.csv and bench.md; bench.png too with `plot` (seconds of matplotlib: not after every run)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    add_ratios(rows)
    with open(out_dir / "bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in CSV_FIELDS})
    modes = meta["modes"]
    lines = [f"# relattn GPU benchmark ({' and '.join({'fwd': 'forward', 'fwdbwd': 'forward+backward'}[m] for m in modes)}, bf16)",
             "", f"commit `{meta['commit']}` · GPU {meta['gpu']} · torch {meta['torch']} · {meta['date']}", "",
             "Shapes: " + ", ".join(f"{n} (B,H,L,D)={SHAPES[n]}" for n in meta["shapes"]), "",
             "TFLOP/s = 4·B·H·L²·D / time for the forward (fwd), 3.5·4·B·H·L²·D / time for forward+backward "
             "(fwdbwd: backward = 2.5x forward, FlashAttention's convention), halved for causal; peak = allocator "
             "high-water mark above the inputs (fwdbwd: including the gradients); vs SDPA-flash = SDPA-flash "
             "plain time / this time (same mode, shape, causal). fwdbwd: gradients of q, k, v and the learnable "
             f"float32 tables; Shaw clipping k={CLIP_K['fwdbwd']}. check: the largest error relative to a float32 "
             f"eager reference on batch 0, heads 0-{CHECK_HEADS - 1} (out, dq, dk, dv and the table gradients; "
             f"above {CHECK_TOL}: MISMATCH, counted for no target). max err: out (and dq, dk, dv) of that slice "
             "against the scheme's first impl; table: the table gradient's relative error.", ""]
    if "fwdbwd" in modes:
        lines += target_lines(rows, meta["shapes"]) + [""]
    lines += ["## All runs", "",
              "| shape | causal | scheme | impl | mode | ms | TFLOP/s | peak MiB | check | max err | table err | "
              "vs SDPA-flash | status |",
              "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['causal']} | {r['scheme']} | {r['impl']} | {r['mode']} | {r.get('ms', '')} | "
                     f"{r.get('tflops', '')} | {r.get('peak_mib', '')} | {r.get('check', '')} | "
                     f"{r.get('max_err', '')} | "
                     f"{r.get('max_err_table', '')} | {r.get('vs_sdpa_flash', '')} | {r['status']} |")
    lines += [""] + meta.get("breakdown", [])
    (out_dir / "bench.md").write_text("\n".join(lines) + "\n")
    if not plot:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        ok = [r for r in rows if r["status"] == "ok"]
        if not ok:
            return
        panels = [m for m in modes if any(r["mode"] == m for r in ok)]
        configs = sorted({(r["shape"], r["causal"]) for r in ok}, key=lambda c: (meta["shapes"].index(c[0]), c[1]))
        n_impls = max(len({(r["impl"], r["scheme"]) for r in ok if r["mode"] == m}) for m in panels)
        colors = {}  # one colour per impl:scheme across both panels
        for r in ok:
            colors.setdefault(f"{r['impl']}:{r['scheme']}", plt.cm.tab20(len(colors) % 20))
        fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                                 figsize=(max(10, 1.2 * len(configs) * n_impls / 4), 6 * len(panels)))
        for ax, mode in zip(axes[:, 0], panels):
            mine = [r for r in ok if r["mode"] == mode]
            impls = []
            for r in mine:
                key = f"{r['impl']}:{r['scheme']}"
                if key not in impls:
                    impls.append(key)
            width = 0.8 / len(impls)
            for n, key in enumerate(impls):
                vals = []
                for c in configs:
                    match = [r for r in mine if (r["shape"], r["causal"]) == c and f"{r['impl']}:{r['scheme']}" == key]
                    vals.append(float(match[0]["tflops"]) if match else 0.0)
                ax.bar([i + n * width for i in range(len(configs))], vals, width, label=key, color=colors[key])
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(configs))])
            ax.set_xticklabels([f"{s}\n{'causal' if c else 'full'}" for s, c in configs], fontsize=7)
            what = {"fwd": "forward", "fwdbwd": "forward+backward"}[mode]
            ax.set_ylabel(f"TFLOP/s ({what}, bf16)")
            ax.set_title(f"{what}: relattn vs PyTorch attention · {meta['gpu']} · torch {meta['torch']} · "
                         f"{meta['commit']}", fontsize=9)
            ax.legend(fontsize=7, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.12))
        fig.tight_layout()
        fig.savefig(out_dir / "bench.png", dpi=120)
        plt.close(fig)
    except Exception as e:  # the plot is a convenience; the CSV and table are the record
        print(f"gpu_bench: no plot ({e})", file=sys.stderr)


def _max_abs_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def _rel_diff(a, b):
    return _max_abs_diff(a, b) / max(b.abs().max().item(), 1e-30)


def summarize(result, mode):
    """What a run keeps of its result for the comparisons, as float32 copies: out (fwdbwd: and dq, dk, dv) of
    the check's slice (batch 0, heads [0, CHECK_HEADS)) and the whole table gradients."""
    out, grads = (result, {}) if mode == "fwd" else result
    kept = {"out": out[:1, :CHECK_HEADS].float().clone()}
    for n, g in grads.items():
        kept[n] = (g[:1, :CHECK_HEADS] if n in ("q", "k", "v") else g).float().clone()
    return kept


def compare(kept, ref):
    """max_err (out; fwdbwd: and dq, dk, dv; absolute) and max_err_table (table gradients, relative) between
    two summarize() results of the same scheme."""
    err = max(_max_abs_diff(kept[n], ref[n]) for n in ("out", "q", "k", "v") if n in kept and n in ref)
    tables = [n for n in kept if n not in ("out", "q", "k", "v") and n in ref]
    terr = f"{max(_rel_diff(kept[n], ref[n]) for n in tables):.3g}" if tables else ""
    return f"{err:.3g}", terr


def check_error(kept, slice_grads, ref):
    """The independent check: the largest relative error (max |x - ref| / max |ref|) of out, dq, dk, dv (kept:
    sliced from the timed call) and of the table gradients (slice_grads: the implementation called on the
    slice) against the float32 reference of the slice."""
    errs = [_rel_diff(kept[n], ref[n]) for n in ("out", "q", "k", "v") if n in kept and n in ref]
    errs += [_rel_diff(g, ref[n]) for n, g in slice_grads.items() if n in ref]
    return max(errs)


# The runs whose kernels are broken down (mode, scheme, impl), on TARGET_SHAPE, non-causal.
PROFILE_RUNS = [("fwd", "plain", "sdpa_flash"), ("fwd", "plain", "relattn"), ("fwd", "shaw_kv", "relattn"),
                ("fwdbwd", "plain", "sdpa_flash"), ("fwdbwd", "plain", "relattn"), ("fwdbwd", "shaw_kv", "relattn"),
                ("fwdbwd", "t5", "relattn")]


def short_kernel_name(name, width=90):
    """'void relattn::cuda::fwd_kernel<Cfg<128>, true>(relattn::...)' -> 'relattn::cuda::fwd_kernel<Cfg<128>, true>';
    names that are not C++ signatures ('Memset (Device)') stay as they are."""
    if name.startswith("void ") and name.endswith(")"):
        depth = 0
        for i in range(len(name) - 1, -1, -1):  # the parameter list: the parentheses that close the name
            depth += name[i] == ")"
            depth -= name[i] == "("
            if depth == 0:
                name = name[5:i]
                break
    return name if len(name) <= width else name[:width - 3] + "..."


def kernel_times(torch, fn, iters=3):
    """[(kernel name, calls per call of fn, ms per call of fn)] of the GPU activity of fn, longest first."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(2):  # warm: id checks, caches, allocator
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    totals = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        calls, us = totals.get(e.name, (0, 0.0))
        totals[e.name] = (calls + 1, us + e.time_range.elapsed_us())
    rows = [(name, calls / iters, us / iters / 1e3) for name, (calls, us) in totals.items()]
    return sorted(rows, key=lambda r: -r[2])


def cuda_alive(torch):
    """Whether the CUDA context still runs kernels (an illegal address or a device-side assertion kills it)."""
    try:
        torch.cuda.synchronize()
        torch.ones(1, device="cuda").add_(1).item()
        return True
    except Exception:
        return False


def breakdown_lines(torch, bench, runs, args, deadline=None):
    """bench.md's kernel breakdown: one table per run of PROFILE_RUNS (errors recorded, never raised); runs
    past `deadline` (time.time()) are left out."""
    B, H, L, D = SHAPES[TARGET_SHAPE]
    lines = [f"## Kernel breakdown ({TARGET_SHAPE}, non-causal; torch.profiler, per call)", "",
             "GPU time per kernel; the sum can be below the timed ms (launch gaps) or above (profiler overhead).",
             ""]
    x = None
    for mode, scheme, impl in runs:
        if (scheme not in args.schemes or mode not in modes_of(args)
                or (args.impls is not None and impl not in args.impls)):
            continue
        lines += [f"### {mode} · {scheme} · {impl}", ""]
        if deadline is not None and time.time() > deadline:
            lines += ["(left out: the budget is spent)", ""]
            continue
        try:
            if x is None:
                torch.cuda.empty_cache()
                x = bench.inputs(B, H, L, D)
            xm = bench.for_mode(x, mode)
            fn = bench.fn(scheme, impl, xm, False) if mode == "fwd" else bench.train_fn(scheme, impl, xm, False)
            kt = kernel_times(torch, fn)
            if not kt:
                lines += ["(the profiler recorded no GPU activity)", ""]
                continue
            total = sum(ms for _, _, ms in kt)
            lines += ["| kernel | launches | ms | share |", "|---|---:|---:|---:|"]
            lines += [f"| `{short_kernel_name(n)}` | {c:g} | {ms:.3f} | {100 * ms / total:.0f}% |" for n, c, ms in kt[:12]]
            if len(kt) > 12:
                rest = sum(ms for _, _, ms in kt[12:])
                lines.append(f"| ({len(kt) - 12} more) | | {rest:.3f} | {100 * rest / total:.0f}% |")
            lines.append(f"| **total** | | **{total:.3f}** | |")
        except Exception as e:  # the breakdown is a tuning aid; the timings above are the record
            lines.append(f"(no breakdown: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})")
        lines.append("")
    return lines


def main(argv=None):
    args = parse_args(argv)
    runs = plan(args)
    if args.dry_run:
        print(f"gpu_bench plan: {len(runs)} runs ({', '.join(modes_of(args))}), budget {args.budget_s:.0f}s, "
              f"out {args.out}")
        for mode, shape, causal, scheme, impl in runs:
            B, H, L, D = SHAPES[shape]
            why = skip_reason(mode, impl, B, H, L, D, None)
            print(f"  {mode:6s} {shape:20s} causal={causal!s:5s} {scheme:8s} {impl:13s} "
                  f"{flops(B, H, L, D, causal, mode) / 1e12:8.2f} TFLOP" + (f"  [{why}]" if why else ""))
        print("targets:")
        for target in TARGETS:
            print(f"  {target[1]}")
        return 0

    import torch
    if not torch.cuda.is_available():
        print("gpu_bench: no GPU visible; nothing to time (use --dry-run to see the plan)", file=sys.stderr)
        return 2
    import relattn
    if not relattn.cuda_kernels_built():
        print("gpu_bench: relattn was built without its CUDA kernels", file=sys.stderr)
        return 2
    bench = Bench(args)
    meta = dict(commit=commit_id(), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                date=datetime.datetime.now().isoformat(timespec="seconds"), shapes=args.shapes, modes=modes_of(args))
    out_dir = Path(args.out)
    rows = []
    refs = {}  # (mode, shape, causal, scheme) -> summarize() of the scheme's first result, until its last use
    checks = {}  # (mode, shape, causal, scheme) -> the float32 reference of the check's slice, likewise
    last_use = {}
    for n, (mode, shape, causal, scheme, impl) in enumerate(runs):
        last_use[(mode, shape, causal, scheme)] = n
    t_start = time.time()
    last_plot = t_start
    state = {"shape": None, "x": None}

    def run_one(n, mode, shape, causal, scheme, impl, row):
        B, H, L, D = SHAPES[shape]
        key = (mode, shape, causal, scheme)
        if shape != state["shape"]:  # tiers revisit shapes; the inputs are seeded, so they are the same
            state["x"] = None
            torch.cuda.empty_cache()
            state["x"] = bench.inputs(B, H, L, D)
            state["shape"] = shape
        torch.cuda.empty_cache()
        why = skip_reason(mode, impl, B, H, L, D, torch.cuda.mem_get_info()[0])
        if why:
            row["status"] = why
            return
        xm = bench.for_mode(state["x"], mode)
        fn = bench.fn(scheme, impl, xm, causal) if mode == "fwd" else bench.train_fn(scheme, impl, xm, causal)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        row["peak_mib"] = f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.0f}"
        verdict = "ok"
        if impl in DROPOUT_IMPLS:  # a random mask: nothing to compare with
            row["max_err"] = row["check"] = "dropout"
            del result
        else:
            kept = summarize(result, mode)
            del result
            if key in refs:
                row["max_err"], row["max_err_table"] = compare(kept, refs[key])
            else:
                refs[key] = kept
                row["max_err"] = "ref"
            torch.cuda.empty_cache()
            xs = bench.for_mode(bench.check_slice(state["x"]), mode)
            if key not in checks:
                checks[key] = bench.reference(scheme, xs, causal, mode)
            slice_grads = {}
            if mode == "fwdbwd" and TRAINED_TABLES[scheme] and impl != "flex":  # (flex: a compile per shape)
                grads = bench.train_fn(scheme, impl, xs, causal)()[1]
                slice_grads = {n: grads[n] for n in TRAINED_TABLES[scheme]}
            err = check_error(kept, slice_grads, checks[key])
            row["check"] = f"{err:.3g}"
            if not err <= CHECK_TOL:  # NaN included
                verdict = f"MISMATCH (check {err:.3g} > {CHECK_TOL})"
        ms = bench.time_ms(fn)
        row["ms"] = f"{ms:.3f}"
        row["tflops"] = f"{flops(B, H, L, D, causal, mode) / (ms * 1e-3) / 1e12:.1f}"
        row["status"] = verdict

    for n, (mode, shape, causal, scheme, impl) in enumerate(runs):
        B, H, L, D = SHAPES[shape]
        row = dict(commit=meta["commit"], gpu=meta["gpu"], torch=meta["torch"], date=meta["date"], mode=mode,
                   shape=shape, B=B, H=H, L=L, D=D, causal=causal, scheme=scheme, impl=impl)
        left = args.budget_s - args.profile_s - (time.time() - t_start)
        if left <= 0 or (impl == "flex" and left < FLEX_START_S):
            row["status"] = ("skipped (budget)" if left <= 0
                             else f"skipped (budget: under {FLEX_START_S}s left for a compile)")
            rows.append(row)
            continue
        dead = None
        try:
            run_one(n, mode, shape, causal, scheme, impl, row)
        except torch.cuda.OutOfMemoryError:
            row["status"] = "OOM"
        except Exception as e:  # one failing baseline must not stop the others
            row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            if not cuda_alive(torch):
                dead = f"{mode} {shape} causal={causal} {scheme} {impl}"
        finally:
            if last_use.get((mode, shape, causal, scheme)) == n:
                refs.pop((mode, shape, causal, scheme), None)
                checks.pop((mode, shape, causal, scheme), None)
            if dead is None:
                torch.cuda.empty_cache()
        rows.append(row)
        if dead is not None:  # an illegal address kills the context: every later call would fail too
            for mode2, shape2, causal2, scheme2, impl2 in runs[n + 1:]:
                B2, H2, L2, D2 = SHAPES[shape2]
                rows.append(dict(commit=meta["commit"], gpu=meta["gpu"], torch=meta["torch"], date=meta["date"],
                                 mode=mode2, shape=shape2, B=B2, H=H2, L=L2, D=D2, causal=causal2, scheme=scheme2,
                                 impl=impl2, status=f"not run (the CUDA context died in {dead})"))
            write_reports(rows, out_dir, meta)
            print(f"gpu_bench: the CUDA context died in {dead} ({row['status']}); the rest were not run. Wrote "
                  f"{out_dir}/bench.csv, bench.md", file=sys.stderr)
            return 3
        print(f"{mode:6s} {shape:20s} causal={causal!s:5s} {scheme:8s} {impl:13s} {row.get('ms', '-'):>9s} ms "
              f"{row.get('tflops', '-'):>7s} TFLOP/s {row.get('peak_mib', '-'):>7s} MiB err {row.get('max_err', '-'):>8s} "
              f"{row['status']}", flush=True)
        # After every run, so that a timeout still leaves the results so far (the plot at most once a minute).
        plot = time.time() - last_plot > 60
        write_reports(rows, out_dir, meta, plot=plot)
        if plot:
            last_plot = time.time()
    if args.profile_s > 0 and TARGET_SHAPE in args.shapes:
        state["x"] = None
        refs.clear()
        checks.clear()
        meta["breakdown"] = breakdown_lines(torch, bench, PROFILE_RUNS, args, deadline=t_start + args.budget_s)
        print("\n".join(meta["breakdown"]))
    write_reports(rows, out_dir, meta)
    if "fwdbwd" in meta["modes"]:
        print("\n".join(target_lines(rows, args.shapes)))
    print(f"gpu_bench: wrote {out_dir}/bench.csv, bench.md, bench.png ({time.time() - t_start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
