"""Weights and their updates over a Muon run: W-ΔW alignment, spectral entropy, stretching.

    python -m experiments.weight_update_dynamics --out reports/weight_update_dynamics [--quick] [--topk 8]

The harness's own optimizer (harness.optim: sharded NorMuon at world size 1, Adam on embeddings,
head and scalars, the tiny preset's learning rates, constant LR and momentum) measured by the
harness's in-run instrument (harness.diagnostics, every `every` steps): per hidden matrix, the
mean cosine of the principal angles between the top-k left singular subspaces of W and of the
applied ΔW (align_wdw), the normalised entropy of σ(W)² (w_entropy) and σ_max(W) (w_smax).
Writes update_alignment.png, entropy_heatmap.png, stretching.png and table.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from base import UserError, atomic_write, run_cli
from experiments import common as C
from harness import dist as hdist
from harness.config import Config
from harness.diagnostics import SpectralDiagnostics
from harness.optim import Optimizers

METRICS = ("align_wdw", "w_entropy", "w_smax")


def run(out_dir, quick: bool = False, seed: int = 0, topk: int = 8, every: int | None = None, **sizes) -> dict:
    size = C.lm_size(quick, **sizes)
    every = every or max(1, size.steps // 20)
    if topk < 1 or every < 1:
        raise UserError(f"--topk {topk} / --every {every}: must be positive integers")
    out = Path(out_dir)
    data = C.LMData(size)
    model = C.make_gpt(size, data.vocab_size, seed)
    cfg = Config(num_layers=size.num_layers, model_dim=size.model_dim, num_heads=size.num_heads, seq_len=size.seq_len,
                 vocab_size=data.vocab_size, seed=seed, diag_every=every, diag_topk=topk, grad_clip=1.0,
                 run_id="weight_update_dynamics", log_dir=str(out))
    info = hdist.DistInfo(0, 1, 0, torch.device("cpu"), None)
    opt = Optimizers(model, cfg, info)
    diag = SpectralDiagnostics(cfg, info, opt, model)
    losses = []
    for step in range(size.steps):
        x, y = data.next()
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        due = diag.due(step)
        if due:
            diag.begin(step)
        opt.step(step, 1.0, cfg.muon_momentum)
        if due:
            diag.end(step)
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
    layers = [r.name for r in C.hidden_matrices(model)]  # model order: block by block
    steps = sorted({s for s, _, _ in diag.history})
    series = {m: {n: [math.nan] * len(steps) for n in layers} for m in METRICS}
    for s, layer, values in diag.history:
        for m in METRICS:
            series[m][layer][steps.index(s)] = values[m]

    fig, axes = C.figure()
    ax = axes[0][0]
    for n in layers:
        ax.plot(steps, series["align_wdw"][n], lw=1, label=n)
    ax.set_xlabel("step")
    ax.set_ylabel(f"alignment of top-{topk} subspaces of W and ΔW")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=5, ncol=2)
    C.save_figure(fig, out / "update_alignment.png")

    fig, axes = C.figure(width=max(6.0, 0.3 * len(steps)), height=max(3.0, 0.25 * len(layers)))
    ax = axes[0][0]
    grid = np.array([series["w_entropy"][n] for n in layers], dtype=float)
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(layers)), layers, fontsize=6)
    ax.set_xticks(range(len(steps)), steps, fontsize=6, rotation=90)
    ax.set_xlabel("step")
    fig.colorbar(im, ax=ax, label="spectral entropy of W")
    C.save_figure(fig, out / "entropy_heatmap.png")

    fig, axes = C.figure()
    ax = axes[0][0]
    for n in layers:
        ax.plot(steps, series["w_smax"][n], lw=1, label=n)
    ax.set_xlabel("step")
    ax.set_ylabel("σ_max(W)")
    ax.legend(fontsize=5, ncol=2)
    C.save_figure(fig, out / "stretching.png")

    rows = []
    for n in layers:
        cells = [n]
        for m in METRICS:
            a, b = C.first_last(series[m][n])
            cells.append(f"{C.fmt(a)} → {C.fmt(b)}")
        cells.append(C.fmt(float(np.nanmean(series["align_wdw"][n])) if any(map(math.isfinite, series["align_wdw"][n])) else math.nan))
        rows.append(cells)
    text = (f"# Weight and update dynamics (NorMuon)\n\n{size.num_layers} layers, width {size.model_dim}, sequence "
            f"{size.seq_len}, batch {size.batch}, {size.steps} steps, vocab {size.vocab}, seed {seed}; measured every "
            f"{every} steps; alignment over the top-{topk} left singular subspaces. Final train loss "
            f"{C.fmt(float(np.mean(losses[-max(1, len(losses) // 10):])), 4)}.\n\n"
            + C.markdown_table(["layer", "alignment W/ΔW start→end", "spectral entropy start→end", "σ_max start→end",
                                "mean alignment"], rows))
    atomic_write(out / "table.md", text)
    return {"size": size.__dict__, "steps": steps, "layers": layers, "series": series, "loss": losses}


def _args(parser) -> None:
    C.lm_arguments(parser)
    parser.add_argument("--topk", type=int, default=8, help="k of the top-k subspaces (default 8)")
    parser.add_argument("--every", type=int, default=None, help="measure every N steps (default steps/20)")


if __name__ == "__main__":
    run_cli(lambda: C.main(run, __doc__.splitlines()[0], _args))
