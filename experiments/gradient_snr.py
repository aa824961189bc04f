"""Gradient signal-to-noise per layer at fixed points of a Muon run, raw and orthogonalized.

    python -m experiments.gradient_snr --out reports/gradient_snr [--quick] [--minibatches 16]

A Muon run (SimpleMuon lr 0.02 on the hidden matrices, Adam 3e-4 on the rest, clip 1.0). At
each of `points` steps the weights are held fixed and B = `minibatches` gradients are taken on
B fresh minibatches; per hidden matrix, SNR = ||mean_b g_b|| / ||std_b g_b|| (harness.spectral.
gradient_snr) of the raw gradients and of their orthogonalized versions (kernels.orthogonalize).
Training then goes on from where it was (the extra minibatches are not trained on).
Writes snr.png and table.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from base import UserError, atomic_write, run_cli
from experiments import common as C
from harness import spectral as sp
from kernels import orthogonalize


def snr_at_point(model, refs, batches) -> dict[str, dict[str, float]]:
    grads: dict[str, list[torch.Tensor]] = {r.name: [] for r in refs}
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        model(x, y).backward()
        for r in refs:
            grads[r.name].append(r.grad().detach().clone())
    model.zero_grad(set_to_none=True)
    out = {}
    for name, gs in grads.items():
        G = torch.stack(gs)
        out[name] = {"raw": float(sp.gradient_snr(G)), "orth": float(sp.gradient_snr(orthogonalize(G)))}
    return out


def run(out_dir, quick: bool = False, seed: int = 0, minibatches: int = 16, points: int = 2, **sizes) -> dict:
    size = C.lm_size(quick, **sizes)
    if minibatches < 2:
        raise UserError(f"--minibatches {minibatches}: SNR needs at least 2")
    if points < 1:
        raise UserError(f"--points {points}: must be a positive integer")
    out = Path(out_dir)
    data = C.LMData(size)
    model = C.make_gpt(size, data.vocab_size, seed)
    opt, _ = C.adam_vs_muon(model, "muon")
    refs = C.hidden_matrices(model)
    # at step 0 the hidden gradients are all zero (zero-initialised head): measure after training
    at = sorted({max(1, round((i + 1) * size.steps / points)) for i in range(points)})
    results: dict[int, dict] = {}
    for step in range(size.steps + 1):
        if step in at:
            results[step] = snr_at_point(model, refs, data.batches(minibatches))
        if step == size.steps:
            break
        x, y = data.next()
        model(x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    names = [r.name for r in refs]
    fig, axes = C.figure(len(at), 1, width=max(6.0, 0.35 * len(names)), height=3.2)
    for ax, step in zip(axes[:, 0], at):
        xs = np.arange(len(names))
        ax.bar(xs - 0.2, [results[step][n]["raw"] for n in names], 0.4, label="raw gradient")
        ax.bar(xs + 0.2, [results[step][n]["orth"] for n in names], 0.4, label="orthogonalized")
        ax.set_xticks(xs, names, rotation=75, fontsize=6)
        ax.set_ylabel("SNR")
        ax.set_title(f"step {step}, {minibatches} minibatches", fontsize=9)
    axes[0][0].legend(fontsize=7)
    C.save_figure(fig, out / "snr.png")

    header = ["layer"] + [f"{kind} @ {s}" for s in at for kind in ("raw", "orth")]
    rows = [[n] + [C.fmt(results[s][n][k]) for s in at for k in ("raw", "orth")] for n in names]
    means = ["mean"] + [C.fmt(float(np.nanmean([results[s][n][k] for n in names]))) for s in at for k in ("raw", "orth")]
    text = (f"# Gradient SNR, raw vs orthogonalized\n\nMuon run: {size.num_layers} layers, width {size.model_dim}, "
            f"sequence {size.seq_len}, batch {size.batch} per minibatch, {size.steps} steps, vocab {size.vocab}, "
            f"seed {seed}. SNR = ||mean_b g_b|| / ||std_b g_b|| over {minibatches} minibatches at a fixed point.\n\n"
            + C.markdown_table(header, rows + [means]))
    atomic_write(out / "table.md", text)
    return {"size": size.__dict__, "points": at, "minibatches": minibatches, "snr": results}


def _args(parser) -> None:
    C.lm_arguments(parser)
    parser.add_argument("--minibatches", type=int, default=16, help="B, minibatches per point (default 16)")
    parser.add_argument("--points", type=int, default=2, help="fixed points over the run (default 2)")


if __name__ == "__main__":
    run_cli(lambda: C.main(run, __doc__.splitlines()[0], _args))
