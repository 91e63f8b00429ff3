"""Trains a relative-position encoder on variable-length sequences packed into fixed rows (segment ids).

The task: at every token, predict the token two positions back *in the same sequence*, or "none" for the
first two tokens of each sequence. Without segment ids a token would see the end of the previous sequence
in its row and predict its tokens instead of "none" (the same model then reaches about 92% here, 18% on
the first tokens). The learned absolute encoding takes the same segment ids and numbers positions inside
each sequence, so its table needs the longest sequence (40 tokens), not the row (128).

    python examples/python/train_packed.py [--steps 150] [--device cpu|cuda]

Prints the loss and the accuracy on fresh packed batches; exits 1 if the accuracy stays below 95%.
"""
import argparse
import sys
import time

import torch
import torch.nn.functional as F

import relattn
from relattn import nn as rnn

VOCAB = 16
NONE = VOCAB  # the class for "no token two positions back"
OFFSET = 2
ROW = 128  # tokens per packed row
IGNORE = -100  # targets of the unused tail of a row


def packed_batch(rows: int, generator: torch.Generator):
    """`rows` rows of ROW tokens, each holding random sequences of 4-40 tokens back to back (numbered 0,
    1, 2, ... along the row, so the ids are non-decreasing: the kernels' fast path). The unused tail gets
    one id per token, continuing the count. Returns tokens, segment ids and targets, each [rows, ROW]."""
    tokens = torch.randint(0, VOCAB, (rows, ROW), generator=generator)
    ids = torch.empty(rows, ROW, dtype=torch.int32)
    targets = torch.full((rows, ROW), IGNORE)
    for r in range(rows):
        start, seq = 0, 0
        while True:
            n = int(torch.randint(4, 41, (1,), generator=generator))
            if start + n > ROW:
                break
            ids[r, start:start + n] = seq
            targets[r, start:start + OFFSET] = NONE
            targets[r, start + OFFSET:start + n] = tokens[r, start:start + n - OFFSET]
            start, seq = start + n, seq + 1
        ids[r, start:] = torch.arange(seq, seq + ROW - start, dtype=torch.int32)
    return tokens, ids, targets


class PackedModel(torch.nn.Module):
    def __init__(self, d_model=64, heads=4, layers=2):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, d_model)
        # Absolute positions restart at every packed sequence (segment_ids below).
        self.position = rnn.LearnedPositionalEncoding(64, d_model)
        layer = rnn.RelativeTransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, dropout=0.0,
                                                   norm_first=True, position="shaw", max_distance=4)
        self.encoder = rnn.RelativeTransformerEncoder(layer, num_layers=layers, norm=torch.nn.LayerNorm(d_model))
        self.head = torch.nn.Linear(d_model, VOCAB + 1)

    def forward(self, tokens, segment_ids):
        x = self.position(self.embed(tokens), segment_ids=segment_ids)
        return self.head(self.encoder(x, segment_ids=segment_ids))


def accuracy(logits, targets):
    real = targets != IGNORE
    return (logits.argmax(-1)[real] == targets[real]).float().mean().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = PackedModel().to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        tokens, ids, targets = (t.to(args.device) for t in packed_batch(args.rows, g))
        logits = model(tokens, ids)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  accuracy {accuracy(logits, targets):.3f}  "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)

    model.eval()
    with torch.no_grad():
        tokens, ids, targets = (t.to(args.device) for t in packed_batch(64, torch.Generator().manual_seed(1)))
        logits = model(tokens, ids)
        acc = accuracy(logits, targets)
        first = targets == NONE
        acc_first = (logits.argmax(-1)[first] == NONE).float().mean().item()
    print(f"held-out accuracy {acc:.3f} (first two tokens of each sequence: {acc_first:.3f})")
    return 0 if acc >= 0.95 else 1


if __name__ == "__main__":
    sys.exit(main())
