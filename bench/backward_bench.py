"""CPU backward algorithms: the time of one backward (gradients of q, k, v, rel_k, rel_v) under each
choice of RELATTN_CPU_BACKWARD (csrc/cpu/attention_kernel.cpp, cpu_backward_plan):

  auto       what a call gets: one fused sweep per (batch, kv head) when those pairs keep the threads busy,
             else the strip sweep with each pair's query blocks split into chunks
  fused      one task per (batch, kv head), whatever the threads
  two-pass   query blocks, then key blocks (8 tile GEMMs where the sweeps take 5)

Shapes: D=64, Shaw rel_k + rel_v over clipped distances (k=32), causal; batch and heads chosen so that the
(batch, kv head) pairs are fewer than, equal to and more than the threads. Each case runs in a fresh
subprocess (median of --repeat backward calls after a warm-up).

    python bench/backward_bench.py [--dtypes float32 bfloat16] [--out bench/results/cpu/backward]
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time

import torch

# (B, H, Hk, L)
SHAPES = [(1, 8, 1, 1024), (1, 8, 2, 2048), (2, 8, 8, 1024), (4, 8, 8, 1024)]
MODES = ["auto", "fused", "two-pass"]
D, K = 64, 32


def child(B, H, Hk, L, dtype, repeat):
    import relattn
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    R = 2 * K + 1
    q = torch.randn(B, H, L, D).to(dt).requires_grad_()
    k, v = (torch.randn(B, Hk, L, D).to(dt).requires_grad_() for _ in range(2))
    rk, rv = ((0.1 * torch.randn(R, D)).to(dt).requires_grad_() for _ in range(2))
    go = torch.randn(B, H, L, D).to(dt)
    out = relattn.attention(q, k, v, rel_k=rk, rel_v=rv, buckets=relattn.clip_buckets(K), causal=True)

    def step():
        torch.autograd.grad(out, (q, k, v, rk, rv), go, retain_graph=True)

    step()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"ms": 1e3 * statistics.median(times)}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", default="bench/results/cpu/backward")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        B, H, Hk, L = map(int, a.child[:4])
        child(B, H, Hk, L, a.child[4], a.repeat)
        return

    rows = []
    for dtype in a.dtypes:
        for B, H, Hk, L in SHAPES:
            row = {"dtype": dtype, "B": B, "H": H, "Hk": Hk, "L": L}
            for mode in MODES:
                env = dict(os.environ, RELATTN_CPU_BACKWARD=mode)
                env.pop("RELATTN_CPU_BACKWARD_CHUNKS", None)
                r = subprocess.run([sys.executable, __file__, "--child", str(B), str(H), str(Hk), str(L), dtype,
                                    "--repeat", str(a.repeat)], capture_output=True, text=True, env=env)
                row[mode] = json.loads(r.stdout.strip().splitlines()[-1])["ms"] if r.returncode == 0 else None
            rows.append(row)
            print(row, flush=True)

    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "backward.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["dtype", "B", "H", "Hk", "L"] + MODES)
        w.writeheader()
        w.writerows(rows)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "?"
    except OSError:
        commit = "?"
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    threads = torch.get_num_threads()
    fmt = lambda x: "failed" if x is None else f"{x:.1f}"
    lines = [f"# relattn CPU backward algorithms\n",
             f"relattn commit {commit}, torch {torch.__version__}, {threads} threads, CPU: {cpu}; D={D}, rel_k + rel_v, "
             f"clip k={K}, causal; one backward (median of {a.repeat}), ms\n",
             "| dtype | B | H | Hk | L | (batch, kv head) pairs | auto | fused (one task per pair) | two-pass | two-pass / auto |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['two-pass'] / r['auto']:.2f}x" if r["auto"] and r["two-pass"] else "n/a"
        lines.append(f"| {r['dtype']} | {r['B']} | {r['H']} | {r['Hk']} | {r['L']} | {r['B'] * r['Hk']} | "
                     f"{fmt(r['auto'])} | {fmt(r['fused'])} | {fmt(r['two-pass'])} | {ratio} |")
    with open(os.path.join(a.out, "backward.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
