"""Packed sequences vs padding: the same batch of variable-length sequences attended two ways.

    python bench/packing_bench.py [--device cpu|cuda] [--sequences 96] [--max-len 512] [--row 4096]

A batch of `--sequences` sequences with lengths drawn uniformly from [max_len/16, max_len] (seeded) goes
through relattn.attention with Shaw relative key and value embeddings plus a bias table over clipped
distances (k=32), H=8, D=64:

  padded   one sequence per batch row, padded to the longest, key_padding_mask marking the padding
           (B = number of sequences, L = max_len)
  packed   sequences packed greedily (first fit, longest first) into rows of `--row` tokens, segment_ids
           numbering them along each row (non-decreasing ids: the kernels skip the tiles between
           sequences); each token of a row's unused tail has an id of its own (one key per query)
  per-seq  each sequence alone (B=1 calls in a loop: no padding, no packing; many small calls)

It checks that the three give the same outputs for every real token, then times forward and
forward+backward (median of --repeat runs) and writes a CSV and a markdown table under --out.
"""
import argparse
import csv
import os
import platform
import statistics
import subprocess
import time

import torch

import relattn


def make_batch(n, max_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(max_len // 16, max_len + 1, (n,), generator=g).tolist()


def pack(lengths, row):
    """First-fit decreasing: a list of rows, each a list of sequence indices."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r in range(len(rows)):
            if room[r] >= lengths[i]:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(row - lengths[i])
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--sequences", type=int, default=96)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--row", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="bench/results/cpu/packing")
    args = ap.parse_args(argv)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    H, D, K = 8, 64, 32
    lengths = make_batch(args.sequences, args.max_len)
    total = sum(lengths)
    g = torch.Generator().manual_seed(1)
    seqs = [[torch.randn(H, n, D, generator=g).to(dev, dtype) for _ in range(3)] for n in lengths]
    rel_k = (0.5 * torch.randn(2 * K + 1, D, generator=g)).to(dev, dtype).requires_grad_()
    rel_v = (0.5 * torch.randn(H, 2 * K + 1, D, generator=g)).to(dev, dtype).requires_grad_()
    rel_bias = torch.randn(H, 2 * K + 1, generator=g).to(dev, dtype).requires_grad_()
    tables = dict(rel_k=rel_k, rel_v=rel_v, rel_bias=rel_bias, buckets=relattn.clip_buckets(K, device=dev))

    # padded: [S, H, max_len, D] and a key padding mask
    Lp = max(lengths)
    padded = [torch.zeros(len(lengths), H, Lp, D, device=dev, dtype=dtype) for _ in range(3)]
    mask = torch.ones(len(lengths), Lp, dtype=torch.bool, device=dev)
    for s, n in enumerate(lengths):
        for t, x in zip(padded, seqs[s]):
            t[s, :, :n] = x
        mask[s, :n] = False
    # packed: rows of args.row tokens with segment ids
    rows = pack(lengths, args.row)
    packed = [torch.zeros(len(rows), H, args.row, D, device=dev, dtype=dtype) for _ in range(3)]
    # Ids numbered along each row (0, 0, ..., 1, 1, ...; the tail gets the next number): non-decreasing, so
    # the kernels skip the tiles between sequences.
    ids = torch.empty((len(rows), args.row), dtype=torch.int32, device=dev)
    where = {}
    for r, members in enumerate(rows):
        o = 0
        for number, s in enumerate(members):
            n = lengths[s]
            for t, x in zip(packed, seqs[s]):
                t[r, :, o:o + n] = x
            ids[r, o:o + n] = number
            where[s] = (r, o)
            o += n
        # the tail: ids of its own, one per token, so that it costs one key per query rather than a
        # (row - used)^2 block of padding attending to itself
        ids[r, o:] = len(members) + torch.arange(args.row - o, dtype=torch.int32, device=dev)

    def run_padded():
        return relattn.attention(*[t.requires_grad_() for t in padded], key_padding_mask=mask, **tables)

    def run_packed():
        return relattn.attention(*[t.requires_grad_() for t in packed], segment_ids=ids, **tables)

    def run_per_seq():
        return [relattn.attention(*[x.unsqueeze(0).requires_grad_() for x in s], **tables) for s in seqs]

    # Same results for every real token.
    with torch.no_grad():
        a, b, c = run_padded(), run_packed(), run_per_seq()
        for s, n in enumerate(lengths):
            r, o = where[s]
            torch.testing.assert_close(a[s, :, :n], c[s][0], rtol=2e-2, atol=2e-3)
            torch.testing.assert_close(b[r, :, o:o + n], c[s][0], rtol=2e-2, atol=2e-3)

    def timed(fn, backward):
        def once():
            with torch.set_grad_enabled(backward):
                out = fn()
            if backward:
                (sum(o.float().sum() for o in out) if isinstance(out, list) else out.float().sum()).backward()
            if dev.type == "cuda":
                torch.cuda.synchronize()
        once()
        ts = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            once()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    results = []
    for name, fn, tokens in (("padded", run_padded, len(lengths) * Lp), ("packed", run_packed, len(rows) * args.row),
                             ("per-seq", run_per_seq, total)):
        fwd = timed(fn, False)
        fb = timed(fn, True)
        results.append(dict(layout=name, tokens=tokens, fwd_ms=round(fwd, 1), fwd_bwd_ms=round(fb, 1)))
        print(results[-1], flush=True)

    os.makedirs(args.out, exist_ok=True)
    commit = os.environ.get("RELATTN_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                                                capture_output=True, text=True).stdout.strip()
    where_run = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    header = (f"commit {commit}, torch {torch.__version__}, {where_run}, {args.dtype}; {len(lengths)} sequences of "
              f"{min(lengths)}-{max(lengths)} tokens ({total} tokens), H={H}, D={D}, Shaw rel_k + rel_v + rel_bias, "
              f"clip k={K}; packed into {len(rows)} rows of {args.row}")
    with open(os.path.join(args.out, "packing.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(results[0]))
        w.writeheader()
        w.writerows(results)
    with open(os.path.join(args.out, "packing.md"), "w") as f:
        f.write(header + "\n\n| layout | tokens computed | fwd ms | fwd+bwd ms |\n|---|---|---|---|\n")
        for r in results:
            f.write(f"| {r['layout']} | {r['tokens']} | {r['fwd_ms']} | {r['fwd_bwd_ms']} |\n")
    print(header)


if __name__ == "__main__":
    main()
