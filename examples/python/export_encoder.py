"""Train in Python, deploy without Python: torch.export + AOTInductor, then run from C++.

Trains a small encoder with Shaw relative positions on a task only relative positions solve (predict the
token two positions back, padded rows of varying length), exports it with `torch.export` (batch and length
dynamic), compiles it ahead of time with AOTInductor into one package file, and checks the package against
the eager model. relattn's ops stay calls of `torch.ops.relattn.*` inside the compiled model, so the
program that loads the package needs relattn's library loaded: `import relattn` in Python, linking
`relattn::relattn` in C++ (examples/cpp/run_exported.cpp).

    python examples/python/export_encoder.py [--out build/export] [--steps 120] [--device cpu|cuda]
    build/example/run_exported build/export/copy_back.pt2 build/export/copy_back_io.pt \
        build/export/copy_back_state.pt build/export/copy_back_state_cpp.pt
    python examples/python/export_encoder.py --check-cpp-weights build/export/copy_back_state_cpp.pt

Writes `<out>/copy_back.pt2` (the package), `<out>/copy_back_io.pt` (test inputs at lengths 32 and 96, with
the eager model's logits) and `<out>/copy_back_state.pt` (the weights, for the same model built in C++ from
relattn::nn). Exits 1 if the model did not learn the task or the package disagrees.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

import relattn  # noqa: F401  (registers torch.ops.relattn.*; the package needs it loaded)
from relattn import nn as rnn

VOCAB = 16
OFFSET = 2  # predict the token this many positions back
IGNORE = -100


class CopyBack(torch.nn.Module):
    def __init__(self, d_model=64, heads=4, layers=2):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, d_model)
        layer = rnn.RelativeTransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, dropout=0.0,
                                                   norm_first=True, position="shaw", max_distance=4)
        self.encoder = rnn.RelativeTransformerEncoder(layer, num_layers=layers, norm=torch.nn.LayerNorm(d_model))
        self.head = torch.nn.Linear(d_model, VOCAB)

    def forward(self, tokens, padding_mask):
        """tokens [B, L] int64; padding_mask [B, L] bool, True = padding. Returns logits [B, L, VOCAB]."""
        return self.head(self.encoder(self.embed(tokens), src_key_padding_mask=padding_mask))


def batch(rows, length, generator):
    """Random tokens, each row padded after a random length in [length/2, length]."""
    tokens = torch.randint(0, VOCAB, (rows, length), generator=generator)
    lengths = torch.randint(length // 2, length + 1, (rows,), generator=generator)
    padding = torch.arange(length)[None, :] >= lengths[:, None]
    targets = torch.full((rows, length), IGNORE)
    targets[:, OFFSET:] = tokens[:, :-OFFSET]
    targets[padding] = IGNORE
    targets[:, :OFFSET] = IGNORE
    return tokens, padding, targets


def accuracy(logits, targets):
    real = targets != IGNORE
    return (logits.argmax(-1)[real] == targets[real]).float().mean().item()


def check_cpp_weights(cpp_path, python_path):
    """Python -> C++ -> Python: the model loads the C++ file strictly, and every tensor is unchanged."""
    model = CopyBack()
    model.load_state_dict(rnn.load_weights(cpp_path))  # strict: every name, no extra one
    saved = torch.load(python_path, weights_only=True)
    same = all(torch.equal(t, saved[n]) for n, t in model.state_dict().items())
    print(f"weights written back by C++ ({cpp_path}): load strictly, {len(saved)} tensors, "
          f"{'all equal to' if same else 'DIFFERENT from'} the ones Python saved")
    return 0 if same else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="build/export")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--check-cpp-weights", metavar="PATH",
                    help="instead: check that the weights run_exported wrote back from C++ "
                         "(relattn::nn::save_state_dict) load into the Python model and equal the saved ones")
    args = ap.parse_args(argv)
    if args.check_cpp_weights:
        return check_cpp_weights(args.check_cpp_weights, os.path.join(args.out, "copy_back_state.pt"))
    os.makedirs(args.out, exist_ok=True)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = CopyBack().to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        tokens, padding, targets = (t.to(args.device) for t in batch(32, 32, g))
        logits = model(tokens, padding)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 40 == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    model.eval()

    # Export: the first call's shapes are examples; batch and length are left dynamic.
    example = batch(4, 32, g)[:2]
    rows, length = torch.export.Dim("rows", max=4096), torch.export.Dim("length", max=65536)
    t0 = time.perf_counter()
    exported = torch.export.export(model, tuple(t.to(args.device) for t in example),
                                   dynamic_shapes=({0: rows, 1: length}, {0: rows, 1: length}))
    package = torch._inductor.aoti_compile_and_package(exported,
                                                       package_path=os.path.join(args.out, "copy_back.pt2"))
    print(f"exported and compiled in {time.perf_counter() - t0:.1f} s: {package}")

    # Check the package against the eager model, at the training length and at 3x it (relative
    # positions clipped at 4 do not care about the length), and save the cases for the C++ program.
    compiled = torch._inductor.aoti_load_package(package)
    io, ok = {}, True
    eval_g = torch.Generator().manual_seed(1)
    for length in (32, 96):
        tokens, padding, targets = (t.to(args.device) for t in batch(16, length, eval_g))
        with torch.no_grad():
            expected = model(tokens, padding)
        got = compiled(tokens, padding)
        diff = (got - expected).abs().max().item()
        acc = accuracy(got, targets)
        print(f"length {length:3d}: package vs eager max |diff| {diff:.2e}, accuracy {acc:.3f}")
        ok &= diff < 1e-4 and acc >= 0.95
        io.update({f"tokens_{length}": tokens.cpu(), f"padding_{length}": padding.cpu(),
                   f"targets_{length}": targets.cpu(), f"logits_{length}": expected.cpu()})
    torch.save(io, os.path.join(args.out, "copy_back_io.pt"))
    # The weights alone, for a C++ program that builds the same model from relattn::nn and loads them
    # (relattn::nn::load_state_dict; a plain dict, which C++ reads).
    torch.save({n: t.cpu() for n, t in model.state_dict().items()}, os.path.join(args.out, "copy_back_state.pt"))
    print("package matches the eager model" if ok else "FAILED: package disagrees or the model did not learn")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
