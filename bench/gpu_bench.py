"""GPU benchmark of relattn's CUDA forward against the ways PyTorch users get the same attention.

Shapes (bf16, each without and with causal masking):
    B4·H16·L4096·D128, B2·H16·L8192·D128, B8·H32·L2048·D64, B1·H16·L16384·D128
Positional schemes and implementations:
    plain     relattn (no relative terms) | SDPA, flash backend | SDPA, default backend
    t5        relattn (rel_bias + t5_buckets) | SDPA with the [1,H,L,L] float bias materialised per call
              (causal folded in as -inf) | FlexAttention score_mod (bias-table gather) | naive eager
    alibi     relattn (alibi_slopes) | FlexAttention score_mod
    shaw_k    relattn (rel_k + clip_buckets(32)) | FlexAttention score_mod gathering a precomputed
              scale·Q·Aᴷᵀ [B,H,L,R] (the precompute is timed too)
    shaw_kv   relattn (rel_k + rel_v + clip_buckets(32)) | relattn_gtab, the same with its per-row tables
              in global memory (RELATTN_CUDA_TABLES=global; a tuning data point); nothing else computes the
              value term without an L×L×D tensor
TFLOP/s use FlashAttention's convention, 4·B·H·Lq·Lk·D per forward, halved for causal. Peak memory is the
allocator's high-water mark above the inputs during one call. Each implementation's output is compared
with the first implementation of its scheme (max_err). Times are medians over repeated calls (CUDA events
via triton.testing.do_bench when Triton is present).

    python bench/gpu_bench.py [--out DIR] [--shapes NAME ...] [--schemes ...] [--budget-s 300] [--quick]
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
# (scheme, impl) in the order they run; the first impl of a scheme is its reference for max_err.
RUNS = [
    ("plain", "sdpa_flash"), ("plain", "relattn"), ("plain", "sdpa_default"),
    ("t5", "relattn"), ("alibi", "relattn"), ("shaw_k", "relattn"), ("shaw_kv", "relattn"),
    ("shaw_kv", "relattn_gtab"),
    ("t5", "sdpa_bias"), ("t5", "naive"),
    ("t5", "flex"), ("alibi", "flex"), ("shaw_k", "flex"),
]
SCHEMES = ("plain", "t5", "alibi", "shaw_k", "shaw_kv")
T5 = (32, 128, True)  # num_buckets, max_distance, bidirectional
CLIP_K = 32           # Shaw clipping distance, R = 65
CSV_FIELDS = ["commit", "gpu", "torch", "date", "shape", "B", "H", "L", "D", "causal", "scheme", "impl", "ms",
              "tflops", "peak_mib", "max_err", "status"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu"), help="output directory")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    ap.add_argument("--impls", nargs="+", default=None,
                    help="only these implementations (relattn, relattn_gtab, sdpa_flash, sdpa_default, sdpa_bias, "
                         "flex, naive)")
    ap.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="stop starting new runs after this many seconds (the rest are recorded as skipped)")
    ap.add_argument("--warmup-ms", type=float, default=50.0)
    ap.add_argument("--rep-ms", type=float, default=300.0)
    ap.add_argument("--quick", action="store_true", help="first shape only, short timings")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes = args.shapes[:1]
        args.warmup_ms, args.rep_ms = 10.0, 50.0
    return args


def plan(args):
    """[(shape_name, causal, scheme, impl)] in run order: relattn and SDPA over every shape first, then the
    materialising baselines, then FlexAttention (whose compiles are the slowest part)."""
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    tiers = ({"relattn", "relattn_gtab", "sdpa_flash", "sdpa_default"}, {"sdpa_bias", "naive"}, {"flex"})
    out = []
    for tier in tiers:
        for shape in args.shapes:
            for causal in causals:
                for scheme, impl in RUNS:
                    if impl in tier and scheme in args.schemes and (args.impls is None or impl in args.impls):
                        out.append((shape, causal, scheme, impl))
    return out


def flops(B, H, L, D, causal):
    f = 4.0 * B * H * L * L * D
    return f / 2 if causal else f


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
    def __init__(self, args):
        import torch
        import relattn
        self.torch, self.relattn, self.args = torch, relattn, args
        self.F = torch.nn.functional
        self._flex = None
        self._block_masks = {}

    def inputs(self, B, H, L, D):
        torch = self.torch
        g = torch.Generator(device="cuda").manual_seed(0)

        def randn(*shape, dtype=torch.bfloat16, std=1.0):
            return (torch.randn(*shape, generator=g, device="cuda") * std).to(dtype)

        x = dict(q=randn(B, H, L, D), k=randn(B, H, L, D), v=randn(B, H, L, D))
        x["t5_buckets"] = self.relattn.t5_buckets(*T5).cuda()
        x["t5_bias"] = randn(H, T5[0], dtype=torch.float32)
        x["clip_buckets"] = self.relattn.clip_buckets(CLIP_K).cuda()
        x["rel_k"] = randn(2 * CLIP_K + 1, D, dtype=torch.float32, std=0.5)
        x["rel_v"] = randn(2 * CLIP_K + 1, D, dtype=torch.float32, std=0.5)
        x["slopes"] = self.relattn.alibi_slopes(H).cuda()
        return x

    def pair_buckets(self, table, L):
        torch = self.torch
        M = (table.numel() - 1) // 2
        i = torch.arange(L, device="cuda").view(-1, 1)
        j = torch.arange(L, device="cuda").view(1, -1)
        return table.long()[(j - i).clamp(-M, M) + M]  # [L, L]

    def flex(self):
        if self._flex is None:
            from torch.nn.attention.flex_attention import flex_attention
            self._flex = self.torch.compile(flex_attention, dynamic=False)
        return self._flex

    def block_mask(self, L, causal):
        if not causal:
            return None
        if L not in self._block_masks:
            from torch.nn.attention.flex_attention import create_block_mask

            def causal_mask(b, h, q_idx, kv_idx):
                return q_idx >= kv_idx
            self._block_masks[L] = create_block_mask(causal_mask, None, None, L, L, device="cuda")
        return self._block_masks[L]

    def fn(self, scheme, impl, x, causal):
        """A zero-argument callable computing the forward."""
        torch, F, ra = self.torch, self.F, self.relattn
        q, k, v = x["q"], x["k"], x["v"]
        L, D = q.shape[2], q.shape[3]
        scale = 1.0 / math.sqrt(D)
        if impl in ("relattn", "relattn_gtab"):
            kw = {"plain": {}, "t5": dict(rel_bias=x["t5_bias"], buckets=x["t5_buckets"]),
                  "alibi": dict(alibi_slopes=x["slopes"]),
                  "shaw_k": dict(rel_k=x["rel_k"], buckets=x["clip_buckets"]),
                  "shaw_kv": dict(rel_k=x["rel_k"], rel_v=x["rel_v"], buckets=x["clip_buckets"])}[scheme]
            if impl == "relattn":
                return lambda: ra.attention(q, k, v, causal=causal, **kw)

            def run():  # the per-row tables in global scratch instead of shared memory (a tuning data point)
                os.environ["RELATTN_CUDA_TABLES"] = "global"
                try:
                    return ra.attention(q, k, v, causal=causal, **kw)
                finally:
                    del os.environ["RELATTN_CUDA_TABLES"]
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
                    bias = bias.masked_fill(torch.ones(L, L, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
                return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
            return run
        if impl == "naive":
            assert scheme == "t5"

            def run():
                s = (q @ k.transpose(-1, -2)).float() * scale
                s = s + x["t5_bias"][:, self.pair_buckets(x["t5_buckets"], L)].unsqueeze(0)
                if causal:
                    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
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
                M = CLIP_K

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


def write_reports(rows, out_dir, meta):
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in CSV_FIELDS})
    lines = [f"# relattn GPU benchmark (forward, bf16)", "",
             f"commit `{meta['commit']}` · GPU {meta['gpu']} · torch {meta['torch']} · {meta['date']}", "",
             "Shapes: " + ", ".join(f"{n} (B,H,L,D)={SHAPES[n]}" for n in meta["shapes"]), "",
             "TFLOP/s = 4·B·H·L²·D / time (halved for causal); peak = allocator high-water mark above the inputs.",
             "", "| shape | causal | scheme | impl | ms | TFLOP/s | peak MiB | max err | status |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['causal']} | {r['scheme']} | {r['impl']} | {r.get('ms', '')} | "
                     f"{r.get('tflops', '')} | {r.get('peak_mib', '')} | {r.get('max_err', '')} | {r['status']} |")
    (out_dir / "bench.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        ok = [r for r in rows if r["status"] == "ok"]
        if not ok:
            return
        configs = sorted({(r["shape"], r["causal"]) for r in ok}, key=lambda c: (meta["shapes"].index(c[0]), c[1]))
        impls = []
        for r in ok:
            key = f"{r['impl']}:{r['scheme']}"
            if key not in impls:
                impls.append(key)
        fig, ax = plt.subplots(figsize=(max(10, 1.2 * len(configs) * len(impls) / 4), 6))
        width = 0.8 / len(impls)
        for n, key in enumerate(impls):
            vals = []
            for c in configs:
                match = [r for r in ok if (r["shape"], r["causal"]) == c and f"{r['impl']}:{r['scheme']}" == key]
                vals.append(float(match[0]["tflops"]) if match else 0.0)
            ax.bar([i + n * width for i in range(len(configs))], vals, width, label=key, color=plt.cm.tab20(n % 20))
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(configs))])
        ax.set_xticklabels([f"{s}\n{'causal' if c else 'full'}" for s, c in configs], fontsize=7)
        ax.set_ylabel("TFLOP/s (forward, bf16)")
        ax.set_title(f"relattn vs PyTorch attention · {meta['gpu']} · torch {meta['torch']} · {meta['commit']}",
                     fontsize=9)
        ax.legend(fontsize=7, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.12))
        fig.tight_layout()
        fig.savefig(out_dir / "bench.png", dpi=120)
    except Exception as e:  # the plot is a convenience; the CSV and table are the record
        print(f"gpu_bench: no plot ({e})", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    runs = plan(args)
    if args.dry_run:
        print(f"gpu_bench plan: {len(runs)} runs, budget {args.budget_s:.0f}s, out {args.out}")
        for shape, causal, scheme, impl in runs:
            B, H, L, D = SHAPES[shape]
            print(f"  {shape:20s} causal={causal!s:5s} {scheme:8s} {impl:13s} {flops(B, H, L, D, causal) / 1e12:8.2f} TFLOP")
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
                date=datetime.datetime.now().isoformat(timespec="seconds"), shapes=args.shapes)
    out_dir = Path(args.out)
    rows = []
    refs = {}  # (shape, causal, scheme) -> the scheme's first output (kept on the GPU, a few GB at most)
    t_start = time.time()
    current_shape, x = None, None
    for shape, causal, scheme, impl in runs:
        B, H, L, D = SHAPES[shape]
        row = dict(commit=meta["commit"], gpu=meta["gpu"], torch=meta["torch"], date=meta["date"], shape=shape,
                   B=B, H=H, L=L, D=D, causal=causal, scheme=scheme, impl=impl)
        if time.time() - t_start > args.budget_s:
            row["status"] = "skipped (budget)"
            rows.append(row)
            continue
        if shape != current_shape:  # tiers revisit shapes; the inputs are seeded, so they are the same
            x = None
            torch.cuda.empty_cache()
            x = bench.inputs(B, H, L, D)
            current_shape = shape
        try:
            fn = bench.fn(scheme, impl, x, causal)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = fn()
            torch.cuda.synchronize()
            row["peak_mib"] = f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.0f}"
            key = (shape, causal, scheme)
            if key in refs:
                row["max_err"] = f"{(out.float() - refs[key].float()).abs().max().item():.3g}"
            else:
                refs[key] = out
                row["max_err"] = "ref"
            del out
            ms = bench.time_ms(fn)
            row["ms"] = f"{ms:.3f}"
            row["tflops"] = f"{flops(B, H, L, D, causal) / (ms * 1e-3) / 1e12:.1f}"
            row["status"] = "ok"
        except torch.cuda.OutOfMemoryError:
            row["status"] = "OOM"
        except Exception as e:  # one failing baseline must not stop the others
            row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        finally:
            fn = None
            torch.cuda.empty_cache()
        rows.append(row)
        print(f"{shape:20s} causal={causal!s:5s} {scheme:8s} {impl:13s} {row.get('ms', '-'):>9s} ms "
              f"{row.get('tflops', '-'):>7s} TFLOP/s {row.get('peak_mib', '-'):>7s} MiB err {row.get('max_err', '-'):>8s} "
              f"{row['status']}", flush=True)
        write_reports(rows, out_dir, meta)  # after every run: a timeout still leaves the results so far
    write_reports(rows, out_dir, meta)
    print(f"gpu_bench: wrote {out_dir}/bench.csv, bench.md, bench.png ({time.time() - t_start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
