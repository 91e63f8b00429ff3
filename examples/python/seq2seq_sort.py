"""An encoder-decoder with relative positions, trained in Python and decoded token by token with a KVCache.

The task: the source is a random set of distinct tokens in random order; the target is the same tokens in
increasing order. The target depends on the set of source tokens only, so the encoder has no positions and
the cross-attention none either (as in T5); the decoder's causal self-attention has a T5 bias table shared
by its layers.

    python examples/python/seq2seq_sort.py [--steps 150] [--device cpu|cuda]

Trains, then sorts held-out sources by greedy decoding: once re-running the decoder over the whole prefix
at every step, once with relattn.nn.KVCache (the memory projected once, one token per call), and once with
KVCache(static_shapes=True) (per-row lengths on the device: the step a CUDA graph or torch.compile would
take). Exits 1 if they disagree or fewer than 90% of the sequences come out sorted.
"""
import argparse
import sys
import time

import torch
import torch.nn.functional as F

from relattn import nn as rnn

VOCAB = 32  # tokens 0..31
BOS = VOCAB  # the decoder's start token
LENGTH = 8


def batch(rows, generator):
    """Sources: LENGTH distinct tokens per row, shuffled; targets: the same, sorted."""
    source = torch.stack([torch.randperm(VOCAB, generator=generator)[:LENGTH] for _ in range(rows)])
    return source, source.sort(dim=1).values


class Sorter(torch.nn.Module):
    def __init__(self, d_model=64, heads=4, layers=2):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB + 1, d_model)
        encoder_layer = rnn.RelativeTransformerEncoderLayer(d_model, heads, 2 * d_model, dropout=0.0,
                                                            norm_first=True, position="none")
        self.encoder = rnn.RelativeTransformerEncoder(encoder_layer, layers, torch.nn.LayerNorm(d_model))
        decoder_layer = rnn.RelativeTransformerDecoderLayer(d_model, heads, 2 * d_model, dropout=0.0,
                                                            norm_first=True, position="t5", num_buckets=8,
                                                            max_distance=16, bidirectional=False)
        self.decoder = rnn.RelativeTransformerDecoder(decoder_layer, layers, torch.nn.LayerNorm(d_model),
                                                      share_relative_tables=True)
        self.head = torch.nn.Linear(d_model, VOCAB)

    def encode(self, source):
        return self.encoder(self.embed(source))

    def decode(self, tokens, memory, cache=None):
        return self.head(self.decoder(self.embed(tokens), memory, tgt_is_causal=True, cache=cache))

    def forward(self, source, target):
        """Teacher forcing: logits for every target position from BOS + target[:-1]."""
        start = torch.full_like(target[:, :1], BOS)
        return self.decode(torch.cat([start, target[:, :-1]], 1), self.encode(source))


@torch.no_grad()
def greedy(model, source, cache_kind):
    """cache_kind: None (re-run the decoder over the prefix), "dynamic" or "static" (a KVCache)."""
    memory = model.encode(source)
    tokens = torch.full_like(source[:, :1], BOS)
    cache = None if cache_kind is None else rnn.KVCache(LENGTH, static_shapes=cache_kind == "static")
    for _ in range(LENGTH):
        step_input = tokens if cache is None else tokens[:, -1:]  # with a cache: the new token only
        logits = model.decode(step_input, memory, cache)[:, -1]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], 1)
    return tokens[:, 1:]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = Sorter().to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        source, target = (t.to(args.device) for t in batch(64, g))
        loss = F.cross_entropy(model(source, target).flatten(0, 1), target.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  ({time.perf_counter() - t0:.1f} s)", flush=True)

    model.eval()
    source, target = (t.to(args.device) for t in batch(256, torch.Generator().manual_seed(1)))
    results, ms = {}, {}
    for kind in (None, "dynamic", "static"):
        greedy(model, source[:2], kind)  # a warm-up (first calls of each path pay one-off set-up costs)
        t0 = time.perf_counter()
        results[kind] = greedy(model, source, kind)
        ms[kind] = (time.perf_counter() - t0) * 1e3
    plain, cached = results[None], results["dynamic"]
    agree = torch.equal(plain, cached) and torch.equal(plain, results["static"])
    solved = (cached == target).all(1).float().mean().item()
    print(f"greedy decoding of 256 sources: without cache {ms[None]:.0f} ms, with KVCache {ms['dynamic']:.0f} "
          f"ms, static_shapes {ms['static']:.0f} ms; same tokens: {agree}; sorted exactly: {solved:.3f}")
    print("example:", source[0].tolist(), "->", cached[0].tolist())
    return 0 if agree and solved >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
