"""CPU benchmark: relattn's fused kernels vs eager PyTorch, forward and forward+backward.

Shapes: B=1, H=8, D=64, L in {256, 1024, 2048, 4096}; Shaw relative key+value embeddings plus a T5-style
bias, all over clipped distances (k=32, R=65). Each case runs in a fresh subprocess, which reports its
median time and its peak extra memory (resident-set high-water mark above the inputs, via
/proc/self/clear_refs + VmHWM).

Implementations:
  relattn        relattn.attention (fused; O(L·D) memory)
  naive          eager with materialised relative tensors, as Shaw-style code usually does:
                 rel_k[β] and rel_v[β] gathered to [L, L, D], scores [B, H, L, L]
  eager-gather   a careful eager version: q·rel_kᵀ [B,H,L,R] gathered into the [L, L] scores, and the
                 value term through scatter-added bucket sums; still O(L²) scores and probabilities
  sdpa-plain     torch's fused scaled_dot_product_attention WITHOUT any relative term: not the same work,
                 the ceiling (plain fused attention) that relattn's relative positions are measured against
  relattn-index  (only when asked for) relattn with the same buckets given per pair as an int32 rel_index
                 [L, L] (structural positions): the same result, without the far-tile fast path
  relattn-dropout  (only when asked for) relattn with attention-weight dropout p = 0.1 (fused, Philox mask)
  sdpa-dropout     (only when asked for) sdpa-plain with dropout_p = 0.1

    python bench/cpu_bench.py [--lengths 256 1024 2048 4096] [--impls ...] [--dtype float32] [--out bench/results/cpu]
"""
import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

B, H, D, K = 1, 8, 64, 32
R = 2 * K + 1


def make_inputs(L, requires_grad, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    def t(*shape):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(requires_grad)
    return dict(q=t(B, H, L, D), k=t(B, H, L, D), v=t(B, H, L, D), rel_k=t(R, D), rel_v=t(R, D),
                rel_bias=t(H, R))


def pair_index(L):
    i = torch.arange(L).view(-1, 1)
    j = torch.arange(L).view(1, -1)
    return (j - i).clamp(-K, K) + K  # clip buckets are the identity table


def run_relattn(x, buckets):
    import relattn
    return relattn.attention(x["q"], x["k"], x["v"], rel_k=x["rel_k"], rel_v=x["rel_v"],
                             rel_bias=x["rel_bias"], buckets=buckets)


def run_relattn_index(x, idx):
    import relattn
    return relattn.attention(x["q"], x["k"], x["v"], rel_k=x["rel_k"], rel_v=x["rel_v"],
                             rel_bias=x["rel_bias"], rel_index=idx)


def run_relattn_dropout(x, buckets):
    import relattn
    return relattn.attention(x["q"], x["k"], x["v"], rel_k=x["rel_k"], rel_v=x["rel_v"],
                             rel_bias=x["rel_bias"], buckets=buckets, dropout_p=0.1)


def run_sdpa_dropout(x, idx):
    return torch.nn.functional.scaled_dot_product_attention(x["q"], x["k"], x["v"], dropout_p=0.1)


def run_naive(x, idx):
    q, k, v = x["q"], x["k"], x["v"]
    ak = x["rel_k"][idx]  # [L, L, D]
    av = x["rel_v"][idx]
    s = (q @ k.transpose(-1, -2) + torch.einsum("bhid,ijd->bhij", q, ak)) / math.sqrt(D)
    s = s + x["rel_bias"][:, idx]
    p = torch.softmax(s, dim=-1)
    return p @ v + torch.einsum("bhij,ijd->bhid", p, av)


def run_gather(x, idx):
    q, k, v = x["q"], x["k"], x["v"]
    L = q.shape[2]
    idx4 = idx.view(1, 1, L, L).expand(B, H, L, L)
    qa = q @ x["rel_k"].t()  # [B, H, L, R]
    s = (q @ k.transpose(-1, -2) + torch.gather(qa, -1, idx4)) / math.sqrt(D)
    s = s + x["rel_bias"][:, idx]
    p = torch.softmax(s, dim=-1)
    psum = torch.zeros(B, H, L, R, dtype=p.dtype).scatter_add(-1, idx4, p)  # Σ_{j: β=r} p_ij
    return p @ v + psum @ x["rel_v"]


def run_sdpa_plain(x, idx):
    return torch.nn.functional.scaled_dot_product_attention(x["q"], x["k"], x["v"])


IMPLS = {"relattn": run_relattn, "naive": run_naive, "eager-gather": run_gather, "sdpa-plain": run_sdpa_plain,
         "relattn-index": run_relattn_index, "relattn-dropout": run_relattn_dropout,
         "sdpa-dropout": run_sdpa_dropout}
DEFAULT_IMPLS = ["relattn", "naive", "eager-gather", "sdpa-plain"]
EAGER_L2 = ("naive", "eager-gather")  # the implementations that hold [L, L] tensors


def rss_hwm_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_hwm():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(impl, L, mode, repeat, dtype):
    """Runs one case; prints a JSON line."""
    torch.manual_seed(0)
    x = make_inputs(L, requires_grad=(mode == "fwd+bwd"), dtype=getattr(torch, dtype))
    aux = torch.tensor(list(range(R))) if impl in ("relattn", "relattn-dropout") else pair_index(L)
    if impl == "relattn-index":
        aux = aux.to(torch.int32)
    fn = IMPLS[impl]

    def step():
        if mode == "fwd":
            with torch.no_grad():
                fn(x, aux)
        else:
            out = fn(x, aux)
            out.backward(torch.ones_like(out))
            for t in x.values():
                t.grad = None

    step()  # warm-up
    times = []
    for _ in range(repeat):
        reset_hwm()
        base = rss_hwm_bytes()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        peak = rss_hwm_bytes() - base
    print(json.dumps({"impl": impl, "L": L, "mode": mode, "ms": 1e3 * statistics.median(times),
                      "peak_mb": peak / 2**20}))


def estimate_eager_gb(impl, L, mode):
    # score-sized [B, H, L, L] tensors (and for naive two [L, L, D] gathers), float32; backward ~3x
    elems = 6 * B * H * L * L + (2 * L * L * D if impl == "naive" else 0)
    return elems * 4 / 2**30 * (3 if mode == "fwd+bwd" else 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048, 4096])
    ap.add_argument("--impls", nargs="+", default=DEFAULT_IMPLS, choices=list(IMPLS))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-gb", type=float, default=14.0, help="skip eager cases estimated above this")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="of every input (relattn accumulates half types in float32)")
    ap.add_argument("--out", default="bench/results/cpu")
    ap.add_argument("--child", nargs=3, metavar=("IMPL", "L", "MODE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], int(a.child[1]), a.child[2], a.repeat, a.dtype)
        return

    rows = []
    for L in a.lengths:
        for mode in ("fwd", "fwd+bwd"):
            for impl in a.impls:
                if impl in EAGER_L2 and estimate_eager_gb(impl, L, mode) > a.max_gb:
                    rows.append({"impl": impl, "L": L, "mode": mode, "ms": None, "peak_mb": None,
                                 "note": f"skipped: needs ~{estimate_eager_gb(impl, L, mode):.0f} GB"})
                    print(rows[-1], flush=True)
                    continue
                repeat = a.repeat if L <= 2048 else max(1, a.repeat - 1)
                r = subprocess.run([sys.executable, __file__, "--child", impl, str(L), mode, "--repeat", str(repeat),
                                    "--dtype", a.dtype],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    rows.append({"impl": impl, "L": L, "mode": mode, "ms": None, "peak_mb": None,
                                 "note": f"failed (exit {r.returncode})"})
                else:
                    rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
                print(rows[-1], flush=True)

    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "cpu_bench.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["impl", "L", "mode", "ms", "peak_mb", "note"])
        w.writeheader()
        for r in rows:
            w.writerow(r)

    # Markdown table: one row per (L, mode), relattn's speed-up over each eager baseline.
    def get(impl, L, mode):
        return next((r for r in rows if r["impl"] == impl and r["L"] == L and r["mode"] == mode), None)

    lines = ["| L | pass | " + " | ".join(f"{i} ms (peak MB)" for i in a.impls) + " | speed-up vs " +
             " / ".join(i for i in a.impls if i != "relattn") + " |",
             "|---|---|" + "---|" * len(a.impls) + "---|"]
    for L in a.lengths:
        for mode in ("fwd", "fwd+bwd"):
            cells, ups = [], []
            base = get("relattn", L, mode)
            for impl in a.impls:
                r = get(impl, L, mode)
                cells.append("n/a" if r is None or r["ms"] is None else f"{r['ms']:.0f} ({r['peak_mb']:.0f})")
                if impl != "relattn":
                    ok = r and r["ms"] and base and base["ms"]
                    ups.append(f"{r['ms'] / base['ms']:.1f}x" if ok else (r or {}).get("note", "n/a"))
            lines.append(f"| {L} | {mode} | " + " | ".join(cells) + " | " + " / ".join(ups) + " |")
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "?"
    except OSError:
        commit = "?"
    info = (f"relattn commit {commit}, torch {torch.__version__}, {torch.get_num_threads()} threads, CPU: {cpu}; "
            f"B={B} H={H} D={D}, rel_k+rel_v+rel_bias, clip k={K} (R={R}), {a.dtype}")
    table = "\n".join(lines)
    with open(os.path.join(a.out, "cpu_bench.md"), "w") as f:
        f.write(f"# relattn CPU benchmark\n\n{info}\n\n{table}\n")
    print(info)
    print(table)


if __name__ == "__main__":
    main()
