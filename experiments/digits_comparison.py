"""The seeds' small classification study: AdamW vs Muon (3 and 5 NS steps) on handwritten digits.

    python -m experiments.digits_comparison --out reports/digits [--epochs 10] [--mnist DIR]

Data: scikit-learn's bundled digits (8x8, 1797 images; offline), or MNIST from the four IDX files
(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte,
optionally .gz) in the folder given by --mnist. A ReLU MLP (input -> hidden -> hidden -> 10).
Optimizers: AdamW (lr 1e-3) on everything; Muon (quintic Newton-Schulz, 3 steps, lr 0.02) and
Muon (5 steps, lr 0.01) on the weight matrices, with AdamW (1e-3) on the biases. Per epoch: the
test accuracy and the effective rank of the weight gradients before and after Newton-Schulz
(averaged over the matrices and the epoch's steps; for AdamW, what NS would make of its
gradients). Writes accuracy.png, eff_rank.png and table.md.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from base import UserError, atomic_write, run_cli
from experiments import common as C
from harness import spectral as sp
from kernels import orthogonalize

ARMS = {  # name: (kind, lr, NS steps)
    "AdamW": ("adamw", 1e-3, 5),
    "Muon NS3": ("muon", 0.02, 3),
    "Muon NS5": ("muon", 0.01, 5),
}
MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format: 2 zero bytes, dtype code, ndim, big-endian dims, data)."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path}: not an unsigned-byte IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise UserError(f"{path}: {len(raw) - offset} data bytes, the header says {int(np.prod(dims))}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def load_data(mnist: str | None, seed: int, limit: int | None = None):
    """(x_train, y_train, x_test, y_test) as float32 in [0, 1] and int64 labels."""
    if mnist:
        root = Path(mnist)
        arrays = {}
        for key, name in MNIST_FILES.items():
            path = next((p for p in (root / name, root / f"{name}.gz") if p.exists()), None)
            if path is None:
                raise UserError(f"--mnist {root}: {name}(.gz) not found (needs {', '.join(MNIST_FILES.values())})")
            arrays[key] = read_idx(path)
        xs = [arrays[k].reshape(len(arrays[k]), -1).astype(np.float32) / 255.0 for k in ("train_x", "test_x")]
        ys = [arrays[k].astype(np.int64) for k in ("train_y", "test_y")]
        xtr, ytr, xte, yte = xs[0], ys[0], xs[1], ys[1]
    else:
        try:
            from sklearn.datasets import load_digits  # the 8x8 digits ship with scikit-learn
        except ImportError:
            raise UserError("the digits study needs scikit-learn (pip install -r requirements-dev.txt), or pass"
                            " --mnist DIR") from None

        d = load_digits()
        x, y = d.data.astype(np.float32) / 16.0, d.target.astype(np.int64)
        order = np.random.default_rng(seed).permutation(len(x))
        cut = int(0.8 * len(x))
        xtr, ytr, xte, yte = x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]
    if limit:
        xtr, ytr = xtr[:limit], ytr[:limit]
    return tuple(torch.from_numpy(a) for a in (xtr, ytr, xte, yte))


def make_mlp(inputs: int, hidden: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def train_arm(name: str, data, hidden: int, epochs: int, batch: int, seed: int) -> dict:
    kind, lr, ns_steps = ARMS[name]
    xtr, ytr, xte, yte = data
    model = make_mlp(xtr.size(1), hidden, seed)
    weights = [p for p in model.parameters() if p.ndim == 2]
    biases = [p for p in model.parameters() if p.ndim < 2]
    if kind == "adamw":
        opts = C.Optimizers(torch.optim.AdamW(model.parameters(), lr=lr))
    else:
        opts = C.Optimizers(C.SimpleMuon(weights, lr=lr, ns_method="quintic", ns_steps=ns_steps),
                            torch.optim.AdamW(biases, lr=1e-3))
    gen = torch.Generator().manual_seed(seed)
    acc, before, after, losses = [], [], [], []
    for _ in range(epochs):
        order = torch.randperm(len(xtr), generator=gen)
        rb, ra, ls = [], [], []
        for i in range(0, len(xtr), batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            loss.backward()
            with torch.no_grad():
                for p in weights:
                    rb.append(float(sp.effective_rank(p.grad)))
                    ra.append(float(sp.effective_rank(orthogonalize(p.grad, method="quintic", steps=ns_steps))))
            opts.step()
            opts.zero_grad()
            ls.append(float(loss.detach()))
        with torch.no_grad():
            acc.append(float((model(xte).argmax(1) == yte).float().mean()))
        before.append(float(np.nanmean(rb)))
        after.append(float(np.nanmean(ra)))
        losses.append(float(np.mean(ls)))
    return {"accuracy": acc, "eff_rank": before, "eff_rank_ns": after, "train_loss": losses}


def run(out_dir, quick: bool = False, seed: int = 0, epochs: int | None = None, hidden: int = 128, batch: int = 64,
        mnist: str | None = None, limit: int | None = None) -> dict:
    epochs = epochs or (5 if quick else 10)
    for flag, v in (("epochs", epochs), ("hidden", hidden), ("batch", batch)):
        if v < 1:
            raise UserError(f"--{flag} {v}: must be a positive integer")
    out = Path(out_dir)
    data = load_data(mnist, seed, limit)
    results = {name: train_arm(name, data, hidden, epochs, batch, seed) for name in ARMS}
    ep = list(range(1, epochs + 1))

    fig, axes = C.figure()
    for name, r in results.items():
        axes[0][0].plot(ep, r["accuracy"], marker="o", label=name)
    axes[0][0].set_xlabel("epoch")
    axes[0][0].set_ylabel("test accuracy")
    axes[0][0].legend()
    C.save_figure(fig, out / "accuracy.png")

    fig, axes = C.figure()
    for i, (name, r) in enumerate(results.items()):
        axes[0][0].plot(ep, r["eff_rank"], marker="o", color=f"C{i}", label=f"{name}: gradient")
        axes[0][0].plot(ep, r["eff_rank_ns"], marker="s", ls="--", color=f"C{i}", label=f"{name}: after NS")
    axes[0][0].set_xlabel("epoch")
    axes[0][0].set_ylabel("mean effective rank of weight gradients")
    axes[0][0].legend(fontsize=7)
    C.save_figure(fig, out / "eff_rank.png")

    rows = [[name, C.fmt(r["accuracy"][-1], 4), C.fmt(max(r["accuracy"]), 4), f"{C.fmt(r['eff_rank'][0])} → "
             f"{C.fmt(r['eff_rank'][-1])}", f"{C.fmt(r['eff_rank_ns'][0])} → {C.fmt(r['eff_rank_ns'][-1])}"]
            for name, r in results.items()]
    source = f"MNIST IDX files in {mnist}" if mnist else "scikit-learn digits (8x8), 80/20 split"
    text = (f"# Digits: AdamW vs Muon\n\n{source}, {len(data[0])} training images; MLP with two hidden layers "
            f"of {hidden}; batch {batch}, {epochs} epochs, seed {seed}. Muon: quintic Newton-Schulz.\n\n"
            + C.markdown_table(["optimizer", "final test acc.", "best test acc.", "eff. rank (epoch 1 → last)",
                                "after NS (epoch 1 → last)"], rows))
    atomic_write(out / "table.md", text)
    return {"epochs": epochs, "arms": results}


def _args(parser) -> None:
    parser.add_argument("--epochs", type=int, default=None, help="default 10 (--quick: 5)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--mnist", default=None, help="folder with MNIST's four IDX files (default: sklearn digits)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N training images")


if __name__ == "__main__":
    run_cli(lambda: C.main(run, __doc__.splitlines()[0], _args))
