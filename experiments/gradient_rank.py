"""The seeds' LLM study: effective rank of the hidden matrices' gradients over training, Adam vs Muon.

    python -m experiments.gradient_rank --out reports/gradient_rank [--quick] [--steps 200 ...]

Two runs from the same initialisation and data: Adam (lr 3e-4) on every parameter, and Muon
(lr 0.02, Nesterov 0.95, polar express 5 steps) on the hidden matrices with Adam (3e-4) on the
rest; gradient clipping at 1.0 for both. At about ten points of each run, the effective rank of
every hidden matrix's raw gradient, and for Muon of its orthogonalized update (after NS).
Writes eff_rank.png, loss.png and table.md ("layer: Adam start→end, Muon start→end, Muon after NS").
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from base import atomic_write, run_cli
from experiments import common as C
from harness import spectral as sp

ADAM_LR = 3e-4
MUON_LR = 0.02
CLIP = 1.0


def train(kind: str, size: C.LMSize, seed: int, measure: int = 10) -> dict:
    """One run; returns losses, the final validation loss and the measured effective ranks."""
    data = C.LMData(size)
    model = C.make_gpt(size, data.vocab_size, seed)
    opt, muon = C.adam_vs_muon(model, kind, adam_lr=ADAM_LR, muon_lr=MUON_LR)
    refs = C.hidden_matrices(model)
    points = set(C.measure_points(size.steps, measure))
    losses, steps = [], []
    raw = {r.name: [] for r in refs}
    after_ns = {r.name: [] for r in refs}
    for step in range(size.steps):
        x, y = data.next()
        loss = model(x, y)
        loss.backward()
        measuring = step in points
        if measuring:
            steps.append(step)
            for r in refs:
                raw[r.name].append(float(sp.effective_rank(r.grad())))
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        if muon is not None:
            muon.record = measuring
        opt.step()
        if muon is not None and measuring:
            for r in refs:
                O = muon.state[r.param]["ns_out"]
                after_ns[r.name].append(float(sp.effective_rank(O.view(-1, *r.shape)[r.index])))
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
    out = {"loss": losses, "steps": steps, "eff_rank": raw, "final_val_loss": C.val_loss(model, data.val())}
    if muon is not None:
        out["eff_rank_ns"] = after_ns
    return out


def run(out_dir, quick: bool = False, seed: int = 0, measure: int = 10, **sizes) -> dict:
    size = C.lm_size(quick, **sizes)
    out = Path(out_dir)
    adam = train("adam", size, seed, measure)
    muon = train("muon", size, seed, measure)
    layers = list(adam["eff_rank"])
    results = {"size": size.__dict__, "adam": adam, "muon": muon, "layers": layers}

    fig, axes = C.figure(1, 3, width=5.0)
    panels = [("Adam: raw gradient", adam["steps"], adam["eff_rank"]),
              ("Muon: raw gradient", muon["steps"], muon["eff_rank"]),
              ("Muon: after Newton-Schulz", muon["steps"], muon["eff_rank_ns"])]
    top = size.model_dim  # every hidden matrix has min(rows, cols) = width
    for ax, (title, steps, ranks) in zip(axes[0], panels):
        for name in layers:
            ax.plot(steps, ranks[name], lw=1, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylim(0, top * 1.05)
    axes[0][0].set_ylabel("effective rank")
    axes[0][2].legend(fontsize=5, ncol=2, loc="lower right")
    C.save_figure(fig, out / "eff_rank.png")

    fig, axes = C.figure()
    ax = axes[0][0]
    for name, r in (("Adam", adam), ("Muon", muon)):
        ax.plot(r["loss"], lw=0.6, alpha=0.4)
        ax.plot(C.ema(r["loss"]), lw=1.5, label=f"{name} (val {r['final_val_loss']:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.legend()
    C.save_figure(fig, out / "loss.png")

    rows = []
    for name in layers:
        a0, a1 = C.first_last(adam["eff_rank"][name])
        m0, m1 = C.first_last(muon["eff_rank"][name])
        n0, n1 = C.first_last(muon["eff_rank_ns"][name])
        rows.append([name, f"{C.fmt(a0)} → {C.fmt(a1)}", f"{C.fmt(m0)} → {C.fmt(m1)}", f"{C.fmt(n0)} → {C.fmt(n1)}"])
    gap = (muon["final_val_loss"] - adam["final_val_loss"]) / adam["final_val_loss"]
    text = (f"# Gradient effective rank, Adam vs Muon\n\n{size.num_layers} layers, width {size.model_dim}, "
            f"{size.num_heads} heads, sequence {size.seq_len}, batch {size.batch}, {size.steps} steps, "
            f"vocab {size.vocab}, seed {seed}. Adam lr {ADAM_LR}, Muon lr {MUON_LR}, clip {CLIP}.\n\n"
            f"Final validation loss: Adam {adam['final_val_loss']:.4f}, Muon {muon['final_val_loss']:.4f} "
            f"({100 * gap:+.1f}%).\n\n"
            + C.markdown_table(["layer", "Adam start→end", "Muon start→end", "Muon after NS"], rows))
    atomic_write(out / "table.md", text)
    return results


def _args(parser) -> None:
    C.lm_arguments(parser)
    parser.add_argument("--measure", type=int, default=10, help="measurement points per run (default 10)")


if __name__ == "__main__":
    run_cli(lambda: C.main(run, __doc__.splitlines()[0], _args))
