"""Positional-encoding workbench: which positional scheme lets a deep encoder generalise to longer inputs?

Run ``python -m relattn.workbench`` (``--help`` lists the knobs). For each scheme it trains the same small
pre-LN encoder (:class:`relattn.nn.RelativeTransformerEncoder`) on a synthetic task whose answer depends
only on relative positions, at one sequence length, then measures per-token accuracy at that length and
at 2x and 4x it. It prints a table and writes ``results.csv``, ``results.png`` and ``config.json`` into
``--out``.

Schemes (``--schemes``):

=============  ==================================================================================
``none``       no positional information at all (a bag of tokens)
``sinusoidal`` fixed sinusoidal encoding added to the input
``learned``    learned table of absolute positions, as long as the training sequences; it cannot
               run on longer ones and is reported as "n/a (table too short)" there
``mlp``        learned MLP of the normalised position ``i / (L - 1)`` added to the input
``shaw``       Shaw et al. relative key and value embeddings, distances clipped at ``--max-distance``
``t5``         T5 learned bias over log-spaced buckets (32 buckets, max distance 128)
``alibi``      ALiBi's fixed linear distance penalty
``clip_bias``  (not run by default) learned bias over distances clipped at ``--max-distance``
=============  ==================================================================================

Tasks (``--task``):

- ``window`` (default): binary label per token: does the same token occur again within ``±window``
  positions? The answer is a function of content and relative distance only, so the right rule is the
  same at every length; with 16 symbols and ``window=5`` about half the labels are 1.
- ``shift``: per token, predict the token ``shift`` positions to its left (the first ``shift`` tokens
  are unlabelled); chance is ``1/16``. ALiBi's penalty is symmetric in the distance, so it cannot
  tell left from right here.

Runs are seeded: the model initialisation, the training stream and the evaluation sets depend only on
``--seed`` (every scheme sees the same data). On CPU the results repeat bit for bit; on GPU, reductions
may differ in the last bits. The defaults (6 layers, width 64, 300 steps of 32 sequences of length 32,
peak learning rate 8e-3) take about 5 CPU-minutes (5-8 minutes on a 2-core machine, single-threaded by
default; see ``--threads``); a GPU is used when present (``--device auto``).
"""
import argparse
import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import cuda_kernels_built
from .nn import (LearnedPositionalEncoding, MLPPositionalEncoding, RelativeTransformerEncoder,
                 RelativeTransformerEncoderLayer, SinusoidalPositionalEncoding)

__all__ = ["Scheme", "SCHEMES", "DEFAULT_SCHEMES", "WindowTask", "ShiftTask", "TASKS", "WorkbenchModel",
           "build_model", "train_model", "evaluate", "majority_baseline", "format_table", "write_csv",
           "write_plot", "parse_args", "run", "main", "NA_TABLE_TOO_SHORT"]

#: How a length a scheme cannot run at is shown in the table, the CSV and the plot.
NA_TABLE_TOO_SHORT = "n/a (table too short)"
IGNORE = -100  # target of unlabelled positions (cross_entropy's ignore_index)


# -- schemes -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scheme:
    """A positional scheme: an absolute encoding added to the input and/or one inside attention."""

    name: str
    description: str
    absolute: Optional[str] = None  # "sinusoidal" | "learned" | "mlp" | None
    position: str = "none"  # RelativeMultiheadAttention's position= argument


SCHEMES: Dict[str, Scheme] = {s.name: s for s in [
    Scheme("none", "no positions"),
    Scheme("sinusoidal", "absolute, fixed sinusoids", absolute="sinusoidal"),
    Scheme("learned", "absolute, learned table", absolute="learned"),
    Scheme("mlp", "absolute, learned MLP of i/(L-1)", absolute="mlp"),
    Scheme("shaw", "relative key+value, clipped", position="shaw"),
    Scheme("t5", "relative bias, T5 buckets", position="t5"),
    Scheme("alibi", "ALiBi linear penalty", position="alibi"),
    Scheme("clip_bias", "relative bias, clipped", position="clip_bias"),
]}
DEFAULT_SCHEMES = ("none", "sinusoidal", "learned", "mlp", "shaw", "t5", "alibi")


# -- tasks -------------------------------------------------------------------------------------------


class WindowTask:
    """Label per token: 1 if the same token occurs again within ``±window`` positions, else 0."""

    name = "window"
    num_classes = 2

    def __init__(self, vocab_size: int = 16, window: int = 5) -> None:
        self.vocab_size = vocab_size
        self.window = window

    def describe(self) -> str:
        return (f"window: does token i occur again within ±{self.window} positions? "
                f"({self.vocab_size} symbols)")

    def targets(self, tokens: Tensor) -> Tensor:
        """``[B, L]`` int64 labels of ``tokens [B, L]``."""
        hit = torch.zeros_like(tokens, dtype=torch.bool)
        for offset in range(1, min(self.window, tokens.shape[1] - 1) + 1):
            same = tokens[:, offset:] == tokens[:, :-offset]  # token i+offset equals token i
            hit[:, offset:] |= same
            hit[:, :-offset] |= same
        return hit.long()

    def sample(self, batch_size: int, length: int, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
        """A batch ``(tokens [B, L], targets [B, L])`` of uniform random tokens (on the CPU)."""
        tokens = torch.randint(0, self.vocab_size, (batch_size, length), generator=generator)
        return tokens, self.targets(tokens)


class ShiftTask:
    """Target per token: the token ``shift`` positions to its left (the first ``shift`` are unlabelled)."""

    name = "shift"

    def __init__(self, vocab_size: int = 16, shift: int = 3) -> None:
        self.vocab_size = vocab_size
        self.shift = shift
        self.num_classes = vocab_size

    def describe(self) -> str:
        return f"shift: predict the token {self.shift} positions to the left ({self.vocab_size} symbols)"

    def targets(self, tokens: Tensor) -> Tensor:
        out = torch.full_like(tokens, IGNORE)
        out[:, self.shift:] = tokens[:, :max(tokens.shape[1] - self.shift, 0)]
        return out

    def sample(self, batch_size: int, length: int, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
        tokens = torch.randint(0, self.vocab_size, (batch_size, length), generator=generator)
        return tokens, self.targets(tokens)


TASKS = {"window": WindowTask, "shift": ShiftTask}


# -- model -------------------------------------------------------------------------------------------


class WorkbenchModel(nn.Module):
    """Token embedding (+ absolute encoding) -> pre-LN relative encoder -> per-token classifier.

    Args:
        scheme: the positional scheme.
        vocab_size, num_classes: task sizes.
        d_model, nhead, num_layers, dim_feedforward: encoder sizes.
        train_length: the training sequence length; the learned table holds exactly this many positions.
        max_distance: clipping distance of "shaw" / "clip_bias".
    """

    def __init__(self, scheme: Scheme, vocab_size: int, num_classes: int, *, d_model: int = 64,
                 nhead: int = 4, num_layers: int = 6, dim_feedforward: Optional[int] = None,
                 train_length: int = 32, max_distance: int = 16) -> None:
        super().__init__()
        self.scheme = scheme
        self.embed = nn.Embedding(vocab_size, d_model)
        if scheme.absolute == "sinusoidal":
            self.absolute = SinusoidalPositionalEncoding(d_model)
        elif scheme.absolute == "learned":
            # Initialised at the scale of the N(0, 1) token embeddings, like the unit-amplitude sinusoids.
            self.absolute = LearnedPositionalEncoding(train_length, d_model, init_std=1.0)
        elif scheme.absolute == "mlp":
            self.absolute = MLPPositionalEncoding(d_model, hidden=64)
        else:
            self.absolute = None
        relative_kwargs = {}
        if scheme.position in ("shaw", "clip_bias"):
            relative_kwargs["max_distance"] = max_distance
        elif scheme.position == "t5":
            relative_kwargs.update(num_buckets=32, max_distance=128)
        layer = RelativeTransformerEncoderLayer(
            d_model, nhead, dim_feedforward or 2 * d_model, dropout=0.0, activation="gelu",
            norm_first=True, position=scheme.position, **relative_kwargs)
        self.encoder = RelativeTransformerEncoder(layer, num_layers, nn.LayerNorm(d_model))
        # The stack deep-copies one layer; give every layer its own random start.
        for layer in self.encoder.layers:
            layer.self_attn.reset_parameters()
            layer.linear1.reset_parameters()
            layer.linear2.reset_parameters()
        self.head = nn.Linear(d_model, num_classes)

    def max_length(self) -> Optional[int]:
        """The longest sequence the model can run on (``None``: any length)."""
        return self.absolute.max_len if isinstance(self.absolute, LearnedPositionalEncoding) else None

    def forward(self, tokens: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """``tokens [B, L]`` -> logits ``[B, L, num_classes]``."""
        x = self.embed(tokens)
        if self.absolute is not None:
            x = self.absolute(x)
        return self.head(self.encoder(x, src_key_padding_mask=key_padding_mask))


def build_model(scheme_name: str, task, *, d_model: int = 64, nhead: int = 4, num_layers: int = 6,
                train_length: int = 32, max_distance: int = 16, seed: int = 0,
                device="cpu") -> WorkbenchModel:
    """The workbench model for one scheme, initialised from ``seed``."""
    torch.manual_seed(seed)
    model = WorkbenchModel(SCHEMES[scheme_name], task.vocab_size, task.num_classes, d_model=d_model,
                           nhead=nhead, num_layers=num_layers, train_length=train_length,
                           max_distance=max_distance)
    return model.to(device)


def train_model(model: nn.Module, task, *, steps: int, length: int, batch_size: int = 32, lr: float = 8e-3,
                seed: int = 0, device="cpu", progress: bool = True, desc: str = "train") -> List[float]:
    """AdamW with linear warm-up (10% of the steps) and cosine decay, gradients clipped at norm 1.

    Returns the training loss of every step. Batches come from a generator seeded with ``seed``.
    """
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 10)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for _ in bar:
        tokens, targets = task.sample(batch_size, length, generator)
        tokens, targets = tokens.to(device), targets.to(device)
        logits = model(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    return losses


def _eval_batches(task, length: int, num_sequences: int, batch_size: int, seed: int):
    """The evaluation set of ``length``: depends only on ``seed`` and ``length``, so every scheme (and the
    majority baseline) sees the same sequences."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + length)
    for start in range(0, num_sequences, batch_size):
        yield task.sample(min(batch_size, num_sequences - start), length, generator)


@torch.no_grad()
def evaluate(model: WorkbenchModel, task, *, length: int, num_sequences: int = 512, batch_size: int = 128,
             seed: int = 0, device="cpu") -> Optional[float]:
    """Per-token accuracy on the evaluation set of ``length`` (``num_sequences`` sequences); ``None`` when
    the model cannot run at that length (its learned table is shorter)."""
    max_length = model.max_length()
    if max_length is not None and length > max_length:
        return None
    model.eval()
    correct = total = 0
    for tokens, targets in _eval_batches(task, length, num_sequences, batch_size, seed):
        tokens, targets = tokens.to(device), targets.to(device)
        predictions = model(tokens).argmax(-1)
        labelled = targets != IGNORE
        correct += int(((predictions == targets) & labelled).sum())
        total += int(labelled.sum())
    return correct / max(total, 1)


def majority_baseline(task, *, length: int, num_sequences: int = 512, batch_size: int = 128,
                      seed: int = 0) -> float:
    """Accuracy of always answering the most frequent label of the evaluation set of ``length``."""
    counts = torch.zeros(task.num_classes, dtype=torch.long)
    for _, targets in _eval_batches(task, length, num_sequences, batch_size, seed):
        counts += torch.bincount(targets[targets != IGNORE], minlength=task.num_classes)
    return float(counts.max()) / max(int(counts.sum()), 1)


# -- the workbench run ---------------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    """``"auto"``: CUDA when a GPU is visible and relattn's CUDA kernels are built, else the CPU."""
    if device == "auto":
        if torch.cuda.is_available() and cuda_kernels_built():
            return torch.device("cuda")
        if torch.cuda.is_available():
            print("workbench: a GPU is visible but relattn was built without CUDA kernels; using the CPU",
                  file=sys.stderr)
        return torch.device("cpu")
    return torch.device(device)


def _format_accuracy(value: Optional[float]) -> str:
    return NA_TABLE_TOO_SHORT if value is None else f"{value:.3f}"


def run(args: argparse.Namespace) -> List[dict]:
    """Train and evaluate every scheme of ``args``; print the table and write the output files.

    Returns one dict per scheme with keys ``scheme``, ``description``, ``parameters``, ``train_seconds``,
    ``final_loss``, ``losses`` and ``accuracy`` (eval length -> accuracy or ``None``). Torch's CPU thread
    count is restored afterwards.
    """
    device = resolve_device(args.device)
    threads = torch.get_num_threads()
    # The default model's matrices are tiny: on the CPU one thread beats several, whose OpenMP
    # synchronisation dominates (and collapses on a busy machine).
    torch.set_num_threads(args.threads or (1 if device.type == "cpu" else threads))
    try:
        return _run(args, device)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, device: torch.device) -> List[dict]:
    from tqdm.auto import tqdm

    task = TASKS[args.task]()
    lengths = [args.length * factor for factor in args.factors]
    os.makedirs(args.out, exist_ok=True)
    progress = not args.no_progress
    started = time.perf_counter()

    results = []
    for name in tqdm(args.schemes, desc="schemes", disable=not progress, dynamic_ncols=True):
        model = build_model(name, task, d_model=args.d_model, nhead=args.heads, num_layers=args.layers,
                            train_length=args.length, max_distance=args.max_distance, seed=args.seed,
                            device=device)
        t0 = time.perf_counter()
        losses = train_model(model, task, steps=args.steps, length=args.length, batch_size=args.batch_size,
                             lr=args.lr, seed=args.seed, device=device, progress=progress, desc=name)
        train_seconds = time.perf_counter() - t0
        accuracy = {length: evaluate(model, task, length=length, num_sequences=args.eval_sequences,
                                     seed=args.seed, device=device) for length in lengths}
        results.append({
            "scheme": name,
            "description": SCHEMES[name].description,
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_seconds": train_seconds,
            "final_loss": float(sum(losses[-10:]) / max(1, len(losses[-10:]))),
            "losses": losses,
            "accuracy": accuracy,
        })
    total_seconds = time.perf_counter() - started

    baselines = {length: majority_baseline(task, length=length, num_sequences=args.eval_sequences,
                                           seed=args.seed) for length in lengths}
    header = (f"relattn positional-encoding workbench\n"
              f"task: {task.describe()}\n"
              f"majority-class accuracy: "
              + ", ".join(f"{baselines[n]:.3f} @{n}" for n in lengths) + "\n"
              f"trained at length {args.length} for {args.steps} steps of {args.batch_size}; "
              f"{args.layers} layers, d_model {args.d_model}, {args.heads} heads; device {device}; "
              f"seed {args.seed}; {total_seconds:.0f} s in all")
    print(header)
    print(format_table(results, lengths))
    write_csv(os.path.join(args.out, "results.csv"), results, lengths)
    write_plot(os.path.join(args.out, "results.png"), results, lengths, baselines, task, args)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump({**vars(args), "device": str(device), "threads": torch.get_num_threads(),
                   "total_seconds": round(total_seconds, 1),
                   "majority_baseline": {str(n): b for n, b in baselines.items()},
                   "torch": torch.__version__}, f, indent=2)
    print(f"wrote {args.out}/results.csv, results.png, config.json")
    return results


def _columns(lengths: Sequence[int]) -> List[str]:
    return ["scheme", "description", "parameters", "train_s", "final_loss"] + [f"acc@{n}" for n in lengths]


def _row(result: dict, lengths: Sequence[int]) -> List[str]:
    return ([result["scheme"], result["description"], str(result["parameters"]),
             f"{result['train_seconds']:.1f}", f"{result['final_loss']:.4f}"]
            + [_format_accuracy(result["accuracy"][n]) for n in lengths])


def format_table(results: Sequence[dict], lengths: Sequence[int]) -> str:
    """The comparison table as aligned text."""
    rows = [_columns(lengths)] + [_row(r, lengths) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    numeric = set(range(2, len(widths)))
    lines = []
    for k, row in enumerate(rows):
        cells = [cell.rjust(w) if i in numeric else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_csv(path: str, results: Sequence[dict], lengths: Sequence[int]) -> None:
    """One row per scheme, the table's columns; unrunnable lengths hold ``NA_TABLE_TOO_SHORT``."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(_columns(lengths))
        for result in results:
            writer.writerow(_row(result, lengths))


def write_plot(path: str, results: Sequence[dict], lengths: Sequence[int], baselines: Dict[int, float], task,
               args: argparse.Namespace) -> None:
    """Left: accuracy per scheme and evaluation length (grouped bars; slots a scheme cannot run are drawn
    hatched and labelled), with each length's majority-class accuracy as a dashed tick. Right: smoothed
    training loss of every scheme."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(lengths)
    colors = plt.get_cmap("viridis")([0.15 + 0.7 * k / max(1, len(lengths) - 1) for k in range(len(lengths))])
    for k, length in enumerate(lengths):
        for i, result in enumerate(results):
            x = i + (k - (len(lengths) - 1) / 2) * width
            value = result["accuracy"][length]
            if value is None:
                ax_acc.bar(x, 1.0, width, facecolor="none", edgecolor="grey", hatch="//", linewidth=0.8)
                ax_acc.text(x, 0.5, NA_TABLE_TOO_SHORT, rotation=90, ha="center", va="center", fontsize=7,
                            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
                continue
            ax_acc.bar(x, value, width, color=colors[k])
            ax_acc.hlines(baselines[length], x - width / 2, x + width / 2, colors="black", linestyles="--",
                          linewidth=1)
    handles = [Patch(color=colors[k], label=f"length {n}") for k, n in enumerate(lengths)]
    handles.append(Line2D([], [], color="black", linestyle="--", linewidth=1, label="majority class"))
    if any(value is None for r in results for value in r["accuracy"].values()):
        handles.append(Patch(facecolor="none", edgecolor="grey", hatch="//", label=NA_TABLE_TOO_SHORT))
    ax_acc.set_xticks(range(len(results)), [r["scheme"] for r in results])
    ax_acc.set_ylim(0, 1.05)
    ax_acc.set_ylabel("per-token accuracy")
    ax_acc.set_title(f"trained at length {args.length}, evaluated at {', '.join(map(str, lengths))}")
    ax_acc.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=len(handles), fontsize=8,
                  frameon=False)

    window = max(1, args.steps // 30)
    for result in results:
        losses = torch.tensor(result["losses"], dtype=torch.float64)
        if losses.numel() >= window:
            losses = losses.unfold(0, window, 1).mean(1)
        ax_loss.plot(losses.numpy(), label=result["scheme"], linewidth=1.2)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel(f"training loss (running mean of {window} steps)" if window > 1 else "training loss")
    ax_loss.set_yscale("log")
    ax_loss.set_title("training")
    ax_loss.legend(fontsize=8, loc="best")
    fig.suptitle(f"relattn workbench: {task.describe()}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _positive_ints(text: str) -> List[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _scheme_list(text: str) -> List[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in SCHEMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown scheme(s) {unknown}; choose from {', '.join(SCHEMES)}")
    return names


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m relattn.workbench",
        description="Train one small deep encoder per positional scheme on a relative-position task and "
                    "compare accuracy at the training length and at longer lengths.")
    parser.add_argument("--task", choices=sorted(TASKS), default="window", help="synthetic task (default window)")
    parser.add_argument("--schemes", type=_scheme_list, default=list(DEFAULT_SCHEMES),
                        help=f"comma-separated, from {', '.join(SCHEMES)} (default: all but clip_bias)")
    parser.add_argument("--steps", type=int, default=300, help="training steps per scheme (default 300)")
    parser.add_argument("--length", type=int, default=32, help="training sequence length (default 32)")
    parser.add_argument("--factors", type=_positive_ints, default=[1, 2, 4],
                        help="evaluation lengths as multiples of --length (default 1,2,4)")
    parser.add_argument("--layers", type=int, default=6, help="encoder layers (default 6)")
    parser.add_argument("--d-model", type=int, default=64, help="model width (default 64)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size (default 32)")
    parser.add_argument("--lr", type=float, default=8e-3, help="peak learning rate (default 8e-3)")
    parser.add_argument("--max-distance", type=int, default=16,
                        help="clipping distance of shaw / clip_bias (default 16)")
    parser.add_argument("--eval-sequences", type=int, default=512,
                        help="sequences per evaluation length (default 512)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (default: 1 on the CPU, where the small default model "
                             "runs fastest single-threaded; torch's choice on a GPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation and data (default 0)")
    parser.add_argument("--out", default="workbench_out", help="output directory (default workbench_out/)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    for name in ("steps", "length", "layers", "d_model", "heads", "batch_size", "eval_sequences"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.d_model % args.heads:
        parser.error(f"--d-model ({args.d_model}) must be divisible by --heads ({args.heads})")
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    """Entry point of ``python -m relattn.workbench``."""
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
