"""Token-by-token decoding: one decode step of the op, and generation through a causal stack with a KVCache.

    python bench/decode_bench.py [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--quick]

step      one query against Lk cached keys (relattn.attention with q_offset = Lk - 1, causal), H heads
          over Hk kv heads: relattn with Shaw rel_k + rel_v + a bias table over clipped distances (k=32);
          relattn with no positional terms; torch's scaled_dot_product_attention with no positional terms
          (the ceiling; enable_gqa where Hk < H). On CUDA also the Shaw call with its keys never split
          (RELATTN_CUDA_SPLITS=1), against the binding's split decode step.
generate  a 6-layer causal stack (d_model 256, 8 heads, T5 bias buckets) generating `--new` tokens after a
          `--prompt`-token prompt, B=4: with a relattn.nn.KVCache (the prompt in one call, then one token
          per call) against re-running the whole causal stack on the growing sequence at every token (no
          cache); also with KVCache(static_shapes=True) (per-row lengths on the device, whole slots
          attended; on CUDA, in addition, its decode step captured once in a CUDA graph and replayed).
          Checks that all give the same hidden states first.

Times are medians (ms); writes decode.csv and decode.md under --out.
"""
import argparse
import csv
import os
import platform
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

import relattn
from relattn.nn import KVCache, RelativeTransformerEncoder, RelativeTransformerEncoderLayer


def median_ms(fn, dev, repeat):
    def once():
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    for _ in range(3):
        once()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        once()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def unsplit(fn):
    """fn with the CUDA binding's key split turned off (RELATTN_CUDA_SPLITS=1), for that call only."""
    def run():
        os.environ["RELATTN_CUDA_SPLITS"] = "1"
        try:
            return fn()
        finally:
            del os.environ["RELATTN_CUDA_SPLITS"]
    return run


def step_rows(dev, dtype, repeat, shapes):
    K = 32
    g = torch.Generator().manual_seed(0)
    rows = []
    for B, H, Hk, Lk, D in shapes:
        q = torch.randn(B, H, 1, D, generator=g).to(dev, dtype)
        k, v = (torch.randn(B, Hk, Lk, D, generator=g).to(dev, dtype) for _ in range(2))
        tables = dict(rel_k=(0.5 * torch.randn(2 * K + 1, D, generator=g)).to(dev, dtype),
                      rel_v=(0.5 * torch.randn(2 * K + 1, D, generator=g)).to(dev, dtype),
                      rel_bias=torch.randn(H, 2 * K + 1, generator=g).to(dev, dtype),
                      buckets=relattn.clip_buckets(K, device=dev))
        fns = {
            "relattn_shaw_kv_bias": lambda: relattn.attention(q, k, v, **tables, causal=True, q_offset=Lk - 1),
            "relattn_plain": lambda: relattn.attention(q, k, v, causal=True, q_offset=Lk - 1),
            "sdpa_plain": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=Hk < H),
        }
        if dev.type == "cuda":
            fns["relattn_shaw_kv_bias_unsplit"] = unsplit(fns["relattn_shaw_kv_bias"])
        with torch.no_grad():
            torch.testing.assert_close(fns["relattn_plain"]().float(), fns["sdpa_plain"]().float(),
                                       rtol=2e-2, atol=2e-3)
            row = dict(B=B, H=H, Hk=Hk, Lk=Lk, D=D)
            row.update({name: round(median_ms(fn, dev, repeat), 3) for name, fn in fns.items()})
        rows.append(row)
        print(row, flush=True)
    return rows


def generate_row(dev, dtype, prompt, new, repeat):
    torch.manual_seed(0)
    layer = RelativeTransformerEncoderLayer(256, 8, 1024, dropout=0.0, norm_first=True, position="t5",
                                            bidirectional=False)
    model = RelativeTransformerEncoder(layer, 6, norm=torch.nn.LayerNorm(256)).eval().to(dev, dtype)
    x = torch.randn(4, prompt + new, 256, generator=torch.Generator().manual_seed(1)).to(dev, dtype)

    def with_cache(static_shapes=False):
        cache = KVCache(prompt + new, static_shapes=static_shapes)
        out = [model(x[:, :prompt], is_causal=True, cache=cache)[:, -1:]]
        for t in range(prompt, prompt + new):
            out.append(model(x[:, t:t + 1], is_causal=True, cache=cache))
        return torch.cat(out, 1)

    def with_cuda_graph():
        # The decode step captured once (after two warm-up steps whose lengths are rewound) and replayed.
        cache = KVCache(prompt + new, static_shapes=True)
        out = [model(x[:, :prompt], is_causal=True, cache=cache)[:, -1:]]
        token = x[:, prompt:prompt + 1].clone()
        saved = cache.lengths
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                model(token, is_causal=True, cache=cache)
        torch.cuda.current_stream().wait_stream(side)
        cache.set_lengths(saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step_out = model(token, is_causal=True, cache=cache)
        cache.set_lengths(saved)
        for t in range(prompt, prompt + new):
            token.copy_(x[:, t:t + 1])
            graph.replay()
            out.append(step_out.clone())
        return torch.cat(out, 1)

    def without_cache():
        return torch.cat([model(x[:, :t], is_causal=True)[:, -1:] for t in range(prompt, prompt + new + 1)], 1)

    variants = {"kv_cache": with_cache, "static_cache": lambda: with_cache(static_shapes=True)}
    if dev.type == "cuda":
        variants["cuda_graph"] = with_cuda_graph
    times = {}
    with torch.no_grad():
        # The cached hidden state of every generated position equals the uncached one.
        want = without_cache()[:, 1:].float()
        for name, fn in variants.items():
            torch.testing.assert_close(fn()[:, 1:].float(), want, rtol=2e-2, atol=2e-2, msg=name)
            times[name] = median_ms(fn, dev, repeat)
        uncached = median_ms(without_cache, dev, max(1, repeat // 2))
    cached = times["kv_cache"]
    row = dict(B=4, layers=6, d_model=256, prompt=prompt, new_tokens=new,
               kv_cache_ms=round(cached, 1), no_cache_ms=round(uncached, 1),
               kv_cache_ms_per_token=round(cached / new, 3), speedup=round(uncached / cached, 1),
               static_cache_ms=round(times["static_cache"], 1),
               cuda_graph_ms=round(times["cuda_graph"], 1) if "cuda_graph" in times else "")
    print(row, flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    ap.add_argument("--out", default="bench/results/cpu/decode")
    args = ap.parse_args(argv)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    # (B, H, Hk, Lk, D): multi-head, then grouped-query heads (Llama-like: 32 query heads over 8 kv heads)
    shapes = ([(1, 8, 8, 2048, 64), (8, 8, 8, 2048, 64), (4, 32, 8, 2048, 128)] if args.quick else
              [(1, 8, 8, 512, 64), (1, 8, 8, 2048, 64), (1, 8, 8, 8192, 64), (8, 8, 8, 2048, 64),
               (8, 8, 8, 8192, 64), (4, 32, 8, 4096, 64), (1, 32, 8, 8192, 128), (4, 32, 4, 2048, 128)])
    repeat = 5 if args.quick else args.repeat
    steps = step_rows(dev, dtype, repeat, shapes)
    gen = generate_row(dev, dtype, args.prompt, args.new, max(2, repeat // 4))

    os.makedirs(args.out, exist_ok=True)
    commit = os.environ.get("RELATTN_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                                                capture_output=True, text=True).stdout.strip()
    where = (torch.cuda.get_device_name() if dev.type == "cuda"
             else f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads")
    header = f"commit {commit}, torch {torch.__version__}, {where}, {args.dtype}"
    with open(os.path.join(args.out, "decode.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(steps[0]))
        w.writeheader()
        w.writerows(steps)
    with open(os.path.join(args.out, "decode.md"), "w") as f:
        f.write(f"{header}\n\nOne decode step (one query, Lk cached keys; ms, median):\n\n"
                "| B | H | Hk | Lk | D | relattn Shaw K+V+bias | relattn plain | SDPA plain |"
                + (" Shaw K+V+bias, keys not split |" if dev.type == "cuda" else "") + "\n"
                "|---|---|---|---|---|---|---|---|" + ("---|" if dev.type == "cuda" else "") + "\n")
        for r in steps:
            f.write(f"| {r['B']} | {r['H']} | {r['Hk']} | {r['Lk']} | {r['D']} | {r['relattn_shaw_kv_bias']} | "
                    f"{r['relattn_plain']} | {r['sdpa_plain']} |"
                    + (f" {r['relattn_shaw_kv_bias_unsplit']} |" if dev.type == "cuda" else "") + "\n")
        f.write(f"\nGeneration, {gen['layers']}-layer causal stack (d_model {gen['d_model']}, T5 bias), "
                f"B={gen['B']}, {gen['prompt']}-token prompt, {gen['new_tokens']} new tokens:\n\n"
                "| KVCache ms (per new token, prompt included) | no cache ms | speed-up | static_shapes ms | "
                "static_shapes + CUDA graph ms |\n|---|---|---|---|---|\n"
                f"| {gen['kv_cache_ms']} ({gen['kv_cache_ms_per_token']}) | {gen['no_cache_ms']} | "
                f"{gen['speedup']}x | {gen['static_cache_ms']} | {gen['cuda_graph_ms'] or 'n/a (CPU)'} |\n")
    print(header)


if __name__ == "__main__":
    main()
