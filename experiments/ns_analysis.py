"""What Newton-Schulz does to real gradients, at several stages of a Muon run, per layer type.

    python -m experiments.ns_analysis --out reports/ns_analysis [--quick] [--stages 4]

A Muon run (SimpleMuon, lr 0.02, on the hidden matrices; Adam 3e-4 on the rest; clip 1.0). At
`stages` evenly spaced steps (the first and the last included) each hidden matrix's raw gradient
G is orthogonalized with kernels.orthogonalize by polar express (5 steps) and by the quintic
iteration (5 steps), and compared with G: effective rank before and after, the angle between
G and NS(G), the relative loss |G - NS(G)|/|G| (plain and with NS(G) rescaled to |G|), and the
band [σ_min, σ_max] of NS(G). Averaged per layer type (attn.q, attn.k, attn.v, attn.proj,
mlp.fc, mlp.proj). Writes ns_metrics.png, spectra.png and table.md.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from base import UserError, atomic_write, run_cli
from experiments import common as C
from harness import spectral as sp
from kernels import orthogonalize

METHODS = ("polar_express", "quintic")
METRICS = ("eff_rank", "eff_rank_ns", "angle_deg", "rel_loss", "rel_loss_scaled", "ns_smin", "ns_smax")


def measure(G: torch.Tensor, method: str) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    O = orthogonalize(G, method=method, steps=5, dtype=torch.float32)
    s, s_ns = sp.singular_values(G), sp.singular_values(O)
    eff = sp.ns_effect(G, O)
    out = {"eff_rank": sp.effective_rank_sv(s), "eff_rank_ns": sp.effective_rank_sv(s_ns),
           "angle_deg": eff.angle_deg, "rel_loss": eff.rel_loss, "rel_loss_scaled": eff.rel_loss_scaled,
           "ns_smin": s_ns[-1], "ns_smax": s_ns[0]}
    return {k: float(v) for k, v in out.items()}, s.numpy(), s_ns.numpy()


def run(out_dir, quick: bool = False, seed: int = 0, stages: int = 4, **sizes) -> dict:
    size = C.lm_size(quick, **sizes)
    if stages < 1:
        raise UserError(f"--stages {stages}: must be a positive integer")
    out = Path(out_dir)
    data = C.LMData(size)
    model = C.make_gpt(size, data.vocab_size, seed)
    opt, _ = C.adam_vs_muon(model, "muon")
    refs = C.hidden_matrices(model)
    # the first steps' hidden gradients are zero (zero-initialised head and projections): start at 2
    points = sorted({min(size.steps - 1, max(2, s)) for s in C.measure_points(size.steps, stages)})
    # per (step, method, type): lists of per-matrix metric dicts; spectra of the last stage
    per: dict = defaultdict(list)
    spectra: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for step in range(size.steps):
        x, y = data.next()
        loss = model(x, y)
        loss.backward()
        if step in points:
            for r in refs:
                G = r.grad().detach().float()
                if G.norm() == 0:
                    continue
                for method in METHODS:
                    m, s, s_ns = measure(G, method)
                    per[(step, method, C.layer_type(r.name))].append(m)
                    if method == METHODS[0]:
                        spectra[C.layer_type(r.name)] = (s, s_ns)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if not math.isfinite(float(loss.detach())):
            break
    table = {key: {k: float(np.mean([m[k] for m in ms])) for k in METRICS} for key, ms in per.items()}
    types = sorted({t for (_, _, t) in table}, key=lambda t: (not t.startswith("attn"), t))

    fig, axes = C.figure(1, 3, width=4.5)
    for ax, (metric, label) in zip(axes[0], [("angle_deg", "angle(G, NS(G)) [deg]"),
                                             ("rel_loss_scaled", "|G - NS(G)·|G|/|NS(G)|| / |G|"),
                                             ("eff_rank_ns", "eff. rank: before (dashed), after NS")]):
        for i, t in enumerate(types):
            steps = [s for s in points if (s, METHODS[0], t) in table]
            ax.plot(steps, [table[(s, METHODS[0], t)][metric] for s in steps], marker="o", color=f"C{i}", label=t)
            if metric == "eff_rank_ns":
                ax.plot(steps, [table[(s, METHODS[0], t)]["eff_rank"] for s in steps], ls="--", color=f"C{i}")
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=9)
    axes[0][0].legend(fontsize=7)
    C.save_figure(fig, out / "ns_metrics.png")

    fig, axes = C.figure(1, 2, width=5.0)
    for i, t in enumerate(types):
        if t not in spectra:
            continue
        s, s_ns = spectra[t]
        axes[0][0].semilogy(s / s[0], color=f"C{i}", label=t)
        axes[0][1].plot(s_ns, color=f"C{i}", label=t)
    axes[0][0].set_title("σ(G) / σ1(G), last stage")
    axes[0][1].set_title("σ(NS(G)), polar express, last stage")
    for ax in axes[0]:
        ax.set_xlabel("index")
    axes[0][0].legend(fontsize=7)
    C.save_figure(fig, out / "spectra.png")

    rows = []
    for s in points:
        for t in types:
            pe, q = table.get((s, "polar_express", t)), table.get((s, "quintic", t))
            if pe is None:
                continue
            rows.append([s, t, C.fmt(pe["eff_rank"]), C.fmt(pe["eff_rank_ns"]), C.fmt(q["eff_rank_ns"]),
                         C.fmt(pe["angle_deg"]), C.fmt(q["angle_deg"]), C.fmt(pe["rel_loss"]),
                         C.fmt(pe["rel_loss_scaled"]), f"{C.fmt(pe['ns_smin'])}–{C.fmt(pe['ns_smax'])}",
                         f"{C.fmt(q['ns_smin'])}–{C.fmt(q['ns_smax'])}"])
    text = (f"# Newton-Schulz on real gradients\n\nMuon run: {size.num_layers} layers, width {size.model_dim}, "
            f"sequence {size.seq_len}, batch {size.batch}, {size.steps} steps, vocab {size.vocab}, seed {seed}. "
            "Raw gradients, means over the matrices of each type; PE = polar express, Q = quintic, 5 steps each.\n\n"
            + C.markdown_table(["step", "type", "eff. rank G", "eff. rank PE(G)", "eff. rank Q(G)", "angle PE [°]",
                                "angle Q [°]", "rel. loss PE", "rel. loss PE (rescaled)", "σ band PE", "σ band Q"], rows))
    atomic_write(out / "table.md", text)
    return {"size": size.__dict__, "stages": points, "types": types,
            "table": {f"{s}/{m}/{t}": v for (s, m, t), v in table.items()}}


def _args(parser) -> None:
    C.lm_arguments(parser)
    parser.add_argument("--stages", type=int, default=4, help="measurement stages over the run (default 4)")


if __name__ == "__main__":
    run_cli(lambda: C.main(run, __doc__.splitlines()[0], _args))
