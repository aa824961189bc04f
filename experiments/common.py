"""What the experiments share: the GPT and its data, a single-process Muon, output files, the CLI.

The language-model studies use harness.model.GPT (the seeds' size by default: 4 layers, width
256, 4 heads, sequence 256, batch 8) on the local corpus shards through data.loader, and
kernels.orthogonalize for every orthogonalization. `vocab="compact"` renumbers the token ids
that occur in the shards to 0..V-1 (no token is merged, so the task is the same) and shrinks
the head from 50304 rows to V (about 2x faster steps on a CPU, where the head is most of the
cost): the default; `--vocab gpt2` keeps GPT-2's 50304 rows, as the seeds' study had.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from base import UserError, atomic_write
from base.cli import ArgumentParser
from harness.config import Config
from harness.model import GPT, ModelShape
from harness.optim import MatrixRef, matrix_refs
from kernels import orthogonalize

GPT2_VOCAB = 50304  # GPT-2's 50257 padded to a multiple of 128


# --- sizes ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LMSize:
    """A language-model study's size. Defaults: the seeds' study."""

    num_layers: int = 4
    model_dim: int = 256
    num_heads: int = 4
    seq_len: int = 256
    batch: int = 8  # sequences per step
    steps: int = 200
    val_batches: int = 8  # batches of `batch` sequences for the final validation loss
    vocab: str = "compact"  # compact | gpt2
    data: str = "data/local"

    def check(self) -> "LMSize":
        for f in ("num_layers", "model_dim", "num_heads", "seq_len", "batch", "steps", "val_batches"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"--{f} {v!r}: must be a positive integer")
        if self.model_dim % self.num_heads or (self.model_dim // self.num_heads) % 2:
            raise UserError(f"--model_dim {self.model_dim} must be a multiple of 2 * --num_heads ({self.num_heads})")
        if self.vocab not in ("gpt2", "compact"):
            raise UserError(f"--vocab {self.vocab!r}: allowed: gpt2, compact")
        return self


# A minutes-scale version for a laptop CPU (--quick).
QUICK = dict(num_layers=2, model_dim=128, num_heads=2, seq_len=128, batch=4, steps=60, val_batches=4, vocab="compact")
# The default of the studies that train several models (rank manipulation: one per mode).
SMALL = dict(num_layers=2, model_dim=128, num_heads=2, seq_len=128, batch=8, steps=150, val_batches=8)


def lm_size(quick: bool, defaults: dict | None = None, **sizes: Any) -> LMSize:
    """QUICK with --quick, else `defaults` (the seeds' size when None), then the given sizes."""
    unknown = set(sizes) - {f.name for f in fields(LMSize)}
    if unknown:
        raise UserError(f"unknown size argument(s) {sorted(unknown)}; allowed: {[f.name for f in fields(LMSize)]}")
    base = LMSize(**QUICK) if quick else LMSize(**(defaults or {}))
    return replace(base, **{k: v for k, v in sizes.items() if v is not None}).check()


# --- data -------------------------------------------------------------------------------------
class LMData:
    """Training batches (x, y) of `batch` sequences from the train shards, and a fixed validation
    set from the val shards; token ids renumbered when the vocabulary is compact."""

    def __init__(self, size: LMSize):
        from data.loader import DistributedTokenLoader
        from data.shards import compact_vocab, find_shards
        from harness.malloc import keep_freed_memory

        keep_freed_memory()  # as the trainer does on CPU: ~1.5x faster steps here
        root = Path(size.data)
        self.train_files = find_shards(str(root / "local_train_*.bin"))
        self.val_files = find_shards(str(root / "local_val_*.bin"))
        self.size = size
        if size.vocab == "compact":
            table, used = compact_vocab(self.train_files + self.val_files)
            self.table = torch.from_numpy(table)
            self.vocab_size = int(math.ceil(used / 128) * 128)
        else:
            self.table = None
            self.vocab_size = GPT2_VOCAB
        self.loader = DistributedTokenLoader(self.train_files, seq_len=size.seq_len, rank=0, world_size=1,
                                             vocab_size=GPT2_VOCAB, prefetch=False)

    def _map(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.table is None else self.table[t]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.loader.next_batch(self.size.batch * self.size.seq_len)
        return self._map(x), self._map(y)

    def batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.next() for _ in range(n)]

    def val(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        from data.loader import val_batches

        s = self.size
        tokens = s.val_batches * s.batch * s.seq_len
        return [(self._map(x), self._map(y)) for x, y in val_batches(
            self.val_files, val_tokens=tokens, seq_len=s.seq_len, rank=0, world_size=1,
            batch_tokens=s.batch * s.seq_len, vocab_size=GPT2_VOCAB)]


def make_gpt(size: LMSize, vocab_size: int, seed: int) -> GPT:
    """harness.model.GPT at this size (the harness's other defaults), initialised from `seed`."""
    cfg = Config(num_layers=size.num_layers, model_dim=size.model_dim, num_heads=size.num_heads,
                 seq_len=size.seq_len, vocab_size=vocab_size)
    torch.manual_seed(seed)
    return GPT(ModelShape.from_config(cfg))


def hidden_matrices(model: GPT) -> list[MatrixRef]:
    """The matrices Muon takes in the harness (attention q, k, v, proj; MLP fc, proj), by name."""
    return matrix_refs(model.param_specs(), dict(model.named_parameters()))


def hidden_params(model: GPT) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(Muon-type parameters, the rest: embeddings, head, scalars)."""
    muon = {s.name for s in model.param_specs() if s.optim == "muon"}
    hidden = [p for n, p in model.named_parameters() if n in muon]
    rest = [p for n, p in model.named_parameters() if n not in muon]
    return hidden, rest


def layer_type(name: str) -> str:
    """blocks.3.attn.qkv.q -> attn.q; blocks.0.mlp.fc.weight -> mlp.fc."""
    parts = [p for p in name.split(".") if p not in ("weight", "qkv") and not p.isdigit() and p != "blocks"]
    return ".".join(parts)


@torch.no_grad()
def val_loss(model: GPT, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    loss = sum(float(model(x, y)) for x, y in batches) / max(len(batches), 1)
    model.train()
    return loss


# --- a single-process Muon --------------------------------------------------------------------
class SimpleMuon(torch.optim.Optimizer):
    """Muon on 2D matrices (or stacks of them, each orthogonalized on its own): Nesterov momentum
    (buf = lerp(buf, g, 1-mu); g = lerp(g, buf, mu)), kernels.orthogonalize, step scaled by
    max(1, rows/cols)^0.5. With `record`, the last orthogonalization's input and output are kept
    in the state ("ns_in", "ns_out") for measurement."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 0.02, momentum: float = 0.95,
                 nesterov: bool = True, ns_method: str = "polar_express", ns_steps: int = 5,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_method=ns_method,
                                      ns_steps=ns_steps, weight_decay=weight_decay))
        self.record = False

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        for group in self.param_groups:
            mu = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.ndim < 2:
                    raise ValueError(f"SimpleMuon takes matrices only (got shape {tuple(p.shape)})")
                state = self.state[p]
                buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - mu)
                g = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                m, n = p.shape[-2:]
                O = orthogonalize(g.reshape(-1, m, n), method=group["ns_method"], steps=group["ns_steps"],
                                  dtype=torch.float32).view_as(p)
                if self.record:
                    state["ns_in"], state["ns_out"] = g.clone(), O
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(O, alpha=-group["lr"] * max(1.0, m / n) ** 0.5)
        return None


class Optimizers:
    """A list of torch optimizers stepped and zeroed together."""

    def __init__(self, *opts: torch.optim.Optimizer):
        self.opts = opts

    def step(self) -> None:
        for o in self.opts:
            o.step()

    def zero_grad(self) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=True)


def adam_vs_muon(model: GPT, kind: str, adam_lr: float = 3e-4, muon_lr: float = 0.02,
                 ns_method: str = "polar_express", ns_steps: int = 5) -> tuple[Optimizers, SimpleMuon | None]:
    """adam: Adam on everything. muon: SimpleMuon on the hidden matrices, Adam (same lr) on the rest."""
    if kind == "adam":
        return Optimizers(torch.optim.Adam(model.parameters(), lr=adam_lr)), None
    if kind == "muon":
        hidden, rest = hidden_params(model)
        muon = SimpleMuon(hidden, lr=muon_lr, ns_method=ns_method, ns_steps=ns_steps)
        return Optimizers(muon, torch.optim.Adam(rest, lr=adam_lr)), muon
    raise ValueError(f"unknown optimizer {kind!r}")


def measure_points(steps: int, count: int = 10) -> list[int]:
    """About `count` step indices from 0 to steps - 1, both ends included."""
    return sorted({round(i * (steps - 1) / max(count - 1, 1)) for i in range(count)})


# --- output files -----------------------------------------------------------------------------
def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    # the format named from `path`: the temp file's own suffix is .tmp
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".") or None, dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def figure(nrows: int = 1, ncols: int = 1, width: float = 6.0, height: float = 4.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)


def fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.3e}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def first_last(values: Sequence[float]) -> tuple[float, float]:
    """The first and last finite values (nan when there is none)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return (finite[0], finite[-1]) if finite else (math.nan, math.nan)


def ema(values: Sequence[float], beta: float = 0.9) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else beta * acc + (1 - beta) * v
        out.append(acc)
    return out


# --- command line -----------------------------------------------------------------------------
def lm_arguments(parser: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    for f in fields(LMSize):
        default = (defaults or {}).get(f.name, f.default)
        parser.add_argument(f"--{f.name}", type=type(f.default), default=None,
                            help=f"(default {default}; --quick: {QUICK.get(f.name, f.default)})")


def build_parser(description: str, add_arguments: Callable[[argparse.ArgumentParser], None]) -> ArgumentParser:
    """A study's flags: --out, --quick, --seed and its own (add_arguments)."""
    parser = ArgumentParser(description=description)
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (figures + table.md)")
    parser.add_argument("--quick", action="store_true", help="a minutes-scale size for a laptop CPU")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the model init (default 0)")
    add_arguments(parser)
    return parser


def main(run: Callable[..., dict], description: str, add_arguments: Callable[[argparse.ArgumentParser], None],
         argv: Sequence[str] | None = None) -> int:
    """`--out DIR [--quick] [--seed N] [size flags]`; a study's `__main__` runs it under base.run_cli
    (UserError -> one `error:` line on stderr, exit 2)."""
    args = vars(build_parser(description, add_arguments).parse_args(argv))
    out, quick, seed = args.pop("out"), args.pop("quick"), args.pop("seed")
    t0 = time.perf_counter()
    run(Path(out), quick=quick, seed=seed, **{k: v for k, v in args.items() if v is not None})
    print(f"wrote {out}/table.md and figures in {time.perf_counter() - t0:.0f}s", flush=True)
    return 0


__all__ = [
    "LMSize", "QUICK", "SMALL", "lm_size", "LMData", "make_gpt", "hidden_matrices", "hidden_params", "layer_type",
    "val_loss", "SimpleMuon", "Optimizers", "adam_vs_muon", "measure_points",
    "save_figure", "figure", "fmt", "markdown_table", "first_last", "ema", "lm_arguments", "build_parser", "main",
]
