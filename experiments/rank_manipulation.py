"""Adam on spectrally transformed gradients: is it the spectrum of the update that matters?

    python -m experiments.rank_manipulation --out reports/rank_manipulation [--quick] [--k 8]

Before each Adam step (lr 3e-4) the gradients are clipped (global norm 1.0), then the gradient of every hidden matrix (attention q, k,
v, proj; MLP fc, proj) is replaced by a matrix with the same singular vectors (harness.spectral.
reshape_spectrum): full (unchanged), low_rank (only the top k singular values kept),
orthonormal (all set to 1: the polar factor), equalized (all set to their mean). Embeddings,
head and scalars get their plain gradients. Default size: the small LM (2 layers, width 128,
sequence 128, batch 8, 150 steps), since it trains one model per mode. Writes loss_curves.png,
final_loss.png, table.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from base import UserError, atomic_write, run_cli
from experiments import common as C
from harness import spectral as sp

ADAM_LR = 3e-4
CLIP = 1.0
MODES = sp.SPECTRUM_MODES


def train(mode: str, size: C.LMSize, seed: int, k: int) -> dict:
    data = C.LMData(size)
    model = C.make_gpt(size, data.vocab_size, seed)
    hidden, _ = C.hidden_params(model)
    opt = torch.optim.Adam(model.parameters(), lr=ADAM_LR)
    losses, ranks = [], []
    for _ in range(size.steps):
        x, y = data.next()
        loss = model(x, y)
        loss.backward()
        # clip the raw gradients first: clipping after the transform would let the transformed
        # matrices' norms (sqrt(n) for orthonormal) shrink the embeddings' and head's steps too
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        with torch.no_grad():
            for p in hidden:
                m, n = p.shape[-2:]
                g = sp.reshape_spectrum(p.grad.reshape(-1, m, n), mode, k)
                p.grad.copy_(g.view_as(p))
                ranks.append(float(sp.effective_rank(g).nan_to_num(0).mean()))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
    tail = losses[-max(1, len(losses) // 10):]
    return {"loss": losses, "final_train_loss": sum(tail) / len(tail), "final_val_loss": C.val_loss(model, data.val()),
            "mean_update_eff_rank": sum(ranks) / max(len(ranks), 1)}


def run(out_dir, quick: bool = False, seed: int = 0, k: int = 8, modes=MODES, **sizes) -> dict:
    size = C.lm_size(quick, C.SMALL, **sizes)  # four models: the small LM by default
    if k < 1:
        raise UserError(f"--k {k}: must be a positive integer")
    out = Path(out_dir)
    results = {mode: train(mode, size, seed, k) for mode in modes}

    fig, axes = C.figure()
    ax = axes[0][0]
    for mode, r in results.items():
        label = f"{mode} (k={k})" if mode == "low_rank" else mode
        ax.plot(C.ema(r["loss"]), lw=1.5, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (EMA 0.9)")
    ax.legend()
    C.save_figure(fig, out / "loss_curves.png")

    fig, axes = C.figure()
    ax = axes[0][0]
    names = list(results)
    ax.bar(names, [results[m]["final_val_loss"] for m in names], color="C0")
    lo = min(results[m]["final_val_loss"] for m in names)
    ax.set_ylim(lo * 0.98, max(results[m]["final_val_loss"] for m in names) * 1.01)
    ax.set_ylabel("final validation loss")
    C.save_figure(fig, out / "final_loss.png")

    rows = [[m, C.fmt(r["final_train_loss"], 4), C.fmt(r["final_val_loss"], 4), C.fmt(r["mean_update_eff_rank"])]
            for m, r in results.items()]
    text = (f"# Rank manipulation: Adam on transformed gradients\n\n{size.num_layers} layers, width "
            f"{size.model_dim}, sequence {size.seq_len}, batch {size.batch}, {size.steps} steps, vocab {size.vocab}, "
            f"seed {seed}; Adam lr {ADAM_LR}, clip {CLIP}; low_rank keeps k = {k}.\n\n"
            + C.markdown_table(["mode", "final train loss (last 10%)", "final val loss",
                                "mean eff. rank of hidden gradients"], rows))
    atomic_write(out / "table.md", text)
    return {"size": size.__dict__, "k": k, "modes": results}


def _args(parser) -> None:
    C.lm_arguments(parser, C.SMALL)
    parser.add_argument("--k", type=int, default=8, help="singular values kept in low_rank mode (default 8)")


if __name__ == "__main__":
    run_cli(lambda: C.main(run, __doc__.splitlines()[0], _args))
