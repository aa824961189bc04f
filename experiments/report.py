"""The research report: the seeds' questions answered by this harness's own runs, at CPU scale.

    python -m experiments.report [--quick] [--out DIR] [--only SECTION,...]     (or: make report)

Runs the studies through the project's own entry points: experiments.gradient_rank,
experiments.digits_comparison, experiments.rank_manipulation and experiments.gradient_snr in
worker processes (--jobs at a time), beside the ORD sweep (sweeps/report_ord.toml: train_gpt.py and train_gpt_muon_new.py on
the tiny preset, 3 seeds) through launch_lr_sweep.py, --jobs runs at a time; its tables and figures through
plot_loss.py's functions on the run logs (harness.logs.format), the weight/update dynamics from the
standard runs' own `diag` lines. Writes reports/<timestamp>/REPORT.md with every section's
figures and table.md beside it, results.json (every number the text quotes) and runs.json (the
commit, and the resolved config and seed of every run). Default sizes took 34.6 minutes on 2
CPU cores (docs/report, --jobs 2); --quick (tiny sizes, 2 seeds: a smoke test of the whole pipeline) under 5.
Everything is seeded and every process runs one thread, so a second run gives the same numbers
on the same machine, whatever --jobs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from base import UserError, atomic_write, run_cli
from base.cli import ArgumentParser
from experiments.common import SMALL, first_last, fmt, markdown_table

ROOT = Path(__file__).resolve().parents[1]
SWEEP_FILE = ROOT / "sweeps" / "report_ord.toml"
SECTIONS = ("gradient_rank", "digits", "rank_manipulation", "gradient_snr", "ord_sweep")
STUDY_ORDER = ("gradient_rank", "rank_manipulation", "gradient_snr", "digits")  # the studies (not the sweep), longest first
BASE, PERP = "baseline_std", "polar_gperp"  # tags in sweeps/report_ord.toml: Polar(G), Polar(G_perp)
FOUR_WAY = {  # group tag in the sweep -> what its update is (the fork's ORD: G_par in its units)
    BASE: "Polar(G)",
    PERP: "Polar(G_perp)",
    "spectral_lr_0.5": "NorMuon(Polar(G - 0.5 G_par)) + 0.5 G_par",
    "spectral_lr_1": "NorMuon(Polar(G_perp)) + 1.0 G_par",
}
# Every study and every sweep run is one process with this many torch threads, whatever the
# machine or --jobs: float sums depend on the thread split, so the numbers repeat everywhere.
THREADS = 1
JOBS = 2  # studies (and sweep runs) side by side by default: one per core of a 2-core machine


@dataclass(frozen=True)
class Sizes:
    """How big each study is. FULL keeps the seeds' LLM study shape (4x256, seq 256, batch 8,
    200 steps) with a compact vocabulary; the small LM serves the many-run studies."""

    lm: dict
    small: dict
    manip_seeds: tuple[int, ...]
    manip_k: int
    snr_minibatches: int
    snr_points: int
    digits_epochs: int
    sweep_seeds: tuple[int, ...]
    sweep_sets: tuple[str, ...] = ()


FULL = Sizes(
    lm=dict(vocab="compact"),
    small=dict(SMALL, vocab="compact"),
    manip_seeds=(0, 1), manip_k=2, snr_minibatches=16, snr_points=3, digits_epochs=10, sweep_seeds=(0, 1, 2),
)
_TINY_LM = dict(num_layers=2, model_dim=64, num_heads=2, seq_len=64, batch=4, steps=12, val_batches=2, vocab="compact")
QUICK = Sizes(
    lm=_TINY_LM, small=_TINY_LM, manip_seeds=(0, 1), manip_k=4, snr_minibatches=4, snr_points=2, digits_epochs=2,
    sweep_seeds=(0, 1),
    sweep_sets=("num_layers=2", "model_dim=64", "num_heads=2", "seq_len=64", "batch_sizes=256,256,256,256",
                "device_batch_tokens=256", "num_scheduled_iterations=6", "num_extension_iterations=0",
                "val_loss_every=3", "val_tokens=512"),
)


# ------------------------------------------------------------------------------------------
# Small helpers


def _git(*args: str) -> str:
    try:
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return r.stdout.strip() if r.returncode == 0 else "unknown"


def _f(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(xs)) if xs else math.nan


def _rel(a: float, b: float) -> float:
    """(b - a) / |a|: the relative change from a to b."""
    return (b - a) / abs(a) if a and math.isfinite(a) and math.isfinite(b) else math.nan


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:+.1f}%"


def _figures(d: Path, root: Path) -> str:
    """Markdown image links for every PNG in d, relative to the report folder."""
    return "\n".join(f"![{p.stem}]({p.relative_to(root).as_posix()})" for p in sorted(d.glob("*.png")))


def _json_safe(x: Any) -> Any:
    if isinstance(x, str) and x.startswith(f"{ROOT}{os.sep}"):
        return Path(x).relative_to(ROOT).as_posix()  # no machine path in a report that gets committed
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return _json_safe(x.item())
    return x


# ------------------------------------------------------------------------------------------
# The studies


@dataclass
class Section:
    title: str
    text: str  # the section's markdown (figures, tables, answer)
    numbers: dict[str, Any] = field(default_factory=dict)  # what the summary and results.json need


def study_gradient_rank(out: Path, sizes: Sizes) -> Section:
    from experiments import gradient_rank

    d = out / "gradient_rank"
    r = gradient_rank.run(d, seed=0, **sizes.lm)
    layers = r["layers"]

    def start_end(run: dict, key: str) -> tuple[float, float]:
        # the first finite value: at step 0 the hidden gradients are zero (zero-initialised head)
        ends = [first_last(run[key][n]) for n in layers]
        return _mean(a for a, _ in ends), _mean(b for _, b in ends)

    adam0, adam1 = start_end(r["adam"], "eff_rank")
    muon0, muon1 = start_end(r["muon"], "eff_rank")
    ns0, ns1 = start_end(r["muon"], "eff_rank_ns")
    def down(run: dict, key: str) -> int:  # matrices whose rank ended below where it started
        return sum(1 for a, b in (first_last(run[key][n]) for n in layers) if b < a)
    n = dict(
        width=r["size"]["model_dim"], layers=len(layers),
        adam_start=adam0, adam_end=adam1, muon_start=muon0, muon_end=muon1, ns_start=ns0, ns_end=ns1,
        adam_layers_down=down(r["adam"], "eff_rank"), muon_layers_down=down(r["muon"], "eff_rank"),
        adam_val=r["adam"]["final_val_loss"], muon_val=r["muon"]["final_val_loss"], size=r["size"],
    )
    gap = _rel(n["adam_val"], n["muon_val"])
    s = r["size"]
    text = f"""{_figures(d, out)}

{(d / "table.md").read_text(encoding="utf-8").split(chr(10), 2)[2].strip()}

Mean over the {len(layers)} hidden matrices (effective rank of the raw gradient, of width {s['model_dim']}):

{markdown_table(["", "start", "end"], [["Adam, raw gradient", fmt(adam0), fmt(adam1)], ["Muon, raw gradient", fmt(muon0), fmt(muon1)],
                             ["Muon, after Newton-Schulz", fmt(ns0), fmt(ns1)]])}
**Answer.** The raw gradients' effective rank moved from {fmt(adam0)} to {fmt(adam1)} under Adam
({n['adam_layers_down']}/{len(layers)} matrices went down) and from {fmt(muon0)} to {fmt(muon1)} under
Muon ({n['muon_layers_down']}/{len(layers)} down); Newton-Schulz lifted Muon's updates to {fmt(ns1)}
of {s['model_dim']} at the end. Final validation loss: Adam {_f(n['adam_val'])}, Muon {_f(n['muon_val'])}
({_pct(gap)}). Scale: one seed, {s['steps']} steps of {s['batch']}x{s['seq_len']} tokens on the local
corpus (Python sources, compact vocabulary), so a loss gap of a few percent is within what another
seed could change.
"""
    return Section("Gradient effective rank over training: Adam vs Muon, before and after Newton-Schulz", text, n)


def study_digits(out: Path, sizes: Sizes) -> Section:
    from experiments import digits_comparison

    d = out / "digits"
    r = digits_comparison.run(d, seed=0, epochs=sizes.digits_epochs)
    arms = r["arms"]
    n = {name: dict(rank_first=a["eff_rank"][0], rank_last=a["eff_rank"][-1], ns_first=a["eff_rank_ns"][0],
                    ns_last=a["eff_rank_ns"][-1], acc_last=a["accuracy"][-1], acc_best=max(a["accuracy"]))
         for name, a in arms.items()}
    fell = [name for name, v in n.items() if v["rank_last"] < v["rank_first"]]
    best = max(n, key=lambda k: n[k]["acc_last"])
    rows = [[name, f"{fmt(v['rank_first'])} → {fmt(v['rank_last'])}", f"{fmt(v['ns_first'])} → {fmt(v['ns_last'])}",
             _f(v["acc_last"], 3)] for name, v in n.items()]
    text = f"""{_figures(d, out)}

{markdown_table(["optimizer", "grad eff. rank, epoch 1 → last", "after NS, epoch 1 → last", "test accuracy (last epoch)"], rows)}
**Answer.** The gradients' effective rank fell from the first to the last epoch for
{len(fell)} of {len(n)} optimizers ({', '.join(fell) or 'none'}); after Newton-Schulz it stays near full.
Best final accuracy: {best} ({_f(n[best]['acc_last'], 3)}). Scale: scikit-learn's 8x8 digits (1,797
images), a 2-hidden-layer MLP, {r['epochs']} epochs, one seed.
"""
    return Section("The small classification study (digits)", text, {"arms": n, "fell": fell, "epochs": r["epochs"]})


def study_rank_manipulation(out: Path, sizes: Sizes) -> Section:
    from experiments import rank_manipulation

    per_seed = {}
    for seed in sizes.manip_seeds:
        d = out / "rank_manipulation" / f"seed{seed}"
        per_seed[seed] = rank_manipulation.run(d, seed=seed, k=sizes.manip_k, **sizes.small)["modes"]
    modes = list(per_seed[sizes.manip_seeds[0]])
    vals = {m: [per_seed[s][m]["final_val_loss"] for s in sizes.manip_seeds] for m in modes}
    mean = {m: _mean(v) for m, v in vals.items()}
    # seed-to-seed spread of one mode: the yardstick for "a difference"
    spread = max((max(v) - min(v)) for v in vals.values())
    full = mean["full"]
    rows = [[m, " / ".join(_f(x) for x in vals[m]), _f(mean[m]), _pct(_rel(full, mean[m]))] for m in modes]
    clear = {m: abs(mean[m] - full) > 2 * spread for m in modes if m != "full"}
    best = min(mean, key=mean.get)
    first = out / "rank_manipulation" / f"seed{sizes.manip_seeds[0]}"
    text = f"""{_figures(first, out)}

{markdown_table(["mode", "final val loss per seed", "mean", "vs full"], rows)}
Largest seed-to-seed spread of one mode: {_f(spread)}; a mode differs "clearly" from full when its
mean is more than twice that away.

**Answer.** Best mode: {best}. {'; '.join(f"{m}: {'clearly ' + ('better' if mean[m] < full else 'worse') if c else 'within noise'}" for m, c in clear.items())}.
low_rank keeps the top {sizes.manip_k} singular values of each gradient; orthonormal and equalized give
every singular value the same size (1, or the mean): they differ only in scale, which Adam's
per-entry normalisation removes (up to its eps), so they should agree. Gradients are clipped
before the transform, so every mode's embeddings and head see the same steps. Figures: seed {sizes.manip_seeds[0]}. Scale: {len(sizes.manip_seeds)} seeds, a
{sizes.small['num_layers']}-layer {sizes.small['model_dim']}-wide GPT, {sizes.small['steps']} steps.
"""
    return Section("Rank manipulation: Adam on transformed gradients", text,
                   {"final_val_loss": vals, "mean": mean, "spread": spread, "clear": clear, "best": best})


def study_gradient_snr(out: Path, sizes: Sizes) -> Section:
    from experiments import gradient_snr

    d = out / "gradient_snr"
    r = gradient_snr.run(d, seed=0, minibatches=sizes.snr_minibatches, points=sizes.snr_points, **sizes.small)
    pts = r["points"]
    per_point = {s: (_mean(v["raw"] for v in r["snr"][s].values()), _mean(v["orth"] for v in r["snr"][s].values()))
                 for s in pts}
    higher = {s: sum(1 for v in r["snr"][s].values() if v["orth"] > v["raw"]) for s in pts}
    count = len(next(iter(r["snr"].values())))
    rows = [[s, fmt(a), fmt(b), f"{higher[s]}/{count}"] for s, (a, b) in per_point.items()]
    if all(b > a for a, b in per_point.values()):
        verdict = "higher"
    elif all(b < a for a, b in per_point.values()):
        verdict = "lower"
    else:
        verdict = "sometimes higher, sometimes lower"
    ratio = _mean(b / a for a, b in per_point.values() if a)
    text = f"""{_figures(d, out)}

{(d / "table.md").read_text(encoding="utf-8").split(chr(10), 2)[2].strip()}

{markdown_table(["step", "mean SNR, raw", "mean SNR, orthogonalized", "matrices where orthogonalized > raw"], rows)}
**Answer.** At the measured points the orthogonalized gradients had {verdict} SNR than the raw
ones (mean over matrices; orthogonalized/raw = {fmt(ratio)} on average over the points). SNR = ||mean_b g_b|| / ||std_b g_b|| over {r['minibatches']}
minibatches at fixed weights. Scale: one seed, a {sizes.small['num_layers']}-layer {sizes.small['model_dim']}-wide GPT.
"""
    return Section("Gradient signal-to-noise: raw against orthogonalized", text,
                   {"points": {str(k): v for k, v in per_point.items()}, "orth_higher": higher, "matrices": count,
                    "verdict": verdict, "ratio": ratio})


# --- the ORD sweep ---------------------------------------------------------------------------


def run_sweep(out: Path, sizes: Sizes, data: Path, jobs: int = 1) -> Path:
    """launch_lr_sweep.py on sweeps/report_ord.toml, `jobs` runs at a time; returns the log folder."""
    from harness.sweep import cli as sweep_cli

    log_dir = out / "runs"
    argv = [str(SWEEP_FILE), "--log_dir", str(log_dir), "--seeds", ",".join(map(str, sizes.sweep_seeds)),
            "--parallel", str(jobs),
            "--set", f"train_files={data / 'local_train_*.bin'}", "--set", f"val_files={data / 'local_val_*.bin'}"]
    for s in sizes.sweep_sets:
        argv += ["--set", s]
    code = sweep_cli.main(argv)
    if code != 0:
        raise UserError(f"the ORD sweep did not finish every run (launcher exit {code}); see {log_dir}/sweeps/")
    return log_dir


def _block_of(layer: str) -> int | None:
    m = re.match(r"blocks\.(\d+)\.", layer)
    return int(m.group(1)) if m else None


def study_ord_sweep(out: Path, sizes: Sizes, data: Path, jobs: int = 1) -> tuple[Section, Section]:
    from harness import plots as PL

    log_dir = run_sweep(out, sizes, data, jobs)
    runs = PL.load_runs([log_dir])
    by_tag: dict[str, list] = {}
    for r in runs:
        by_tag.setdefault(r.tag, []).append(r)
    d = out / "ord_sweep"
    rows = PL.final_loss_table(runs, "tag", BASE)
    PL.plot_final_bars(rows, d)
    PL.plot_val_loss(runs, "tag", d, x="step")
    rows_perp = PL.final_loss_table(runs, "tag", PERP) if PERP in by_tag else []
    four = [r for r in runs if r.tag in FOUR_WAY]
    d4 = out / "ord_four_way"
    rows4 = PL.final_loss_table(four, "tag", BASE)
    PL.plot_final_bars(rows4, d4)
    PL.plot_val_loss(four, "tag", d4, x="step")
    seed0 = sorted((r for r in runs if r.tag in (PERP, "spectral_lr_1") and r.config["seed"] == sizes.sweep_seeds[0]),
                   key=lambda r: r.tag)
    d_rho = out / "ord_rho"
    PL.plot_ord(seed0, d_rho)

    # rho and ||G_par||/||G|| (mean over layers and seeds) at the first and last collection
    rho_rows, rho_numbers = [], {}
    for tag in sorted(by_tag, key=lambda t: (t != BASE, t)):
        first, last = [], []
        for r in by_tag[tag]:
            # step 0 is trivially 0: the hidden gradients start at zero (zero-initialised head)
            steps = sorted({dg.step for dg in r.diags if "rho" in dg.values and dg.step > 0})
            if not steps:
                continue
            pick = lambda s, k: _mean(dg.values[k] for dg in r.diags if dg.step == s and k in dg.values)  # noqa: E731
            first.append((pick(steps[0], "rho"), pick(steps[0], "spectral_frac")))
            last.append((pick(steps[-1], "rho"), pick(steps[-1], "spectral_frac")))
        if first:
            v = [_mean(x[0] for x in first), _mean(x[0] for x in last), _mean(x[1] for x in first), _mean(x[1] for x in last)]
            rho_numbers[tag] = v
            rho_rows.append([tag, *(fmt(x) for x in v)])

    numbers = {
        "groups": {r.group: dict(n=r.n, mean=r.mean, std=r.std, delta=r.delta, p=r.p_value, values=r.values) for r in rows},
        "rho": rho_numbers,
        "vs_perp": {r.group: dict(delta=r.delta, p=r.p_value) for r in rows_perp},
    }
    base = next(r for r in rows if r.is_baseline)
    better = [r for r in rows if not r.is_baseline and r.p_value is not None and r.p_value < 0.05 and r.delta < 0]
    worse = [r for r in rows if not r.is_baseline and r.p_value is not None and r.p_value < 0.05 and r.delta > 0]
    better_perp = [r.group for r in rows_perp if r.group.startswith("spectral_lr_") and not r.is_baseline
                   and r.p_value is not None and r.p_value < 0.05 and r.delta < 0]
    worse_perp = [r.group for r in rows_perp if r.group.startswith("spectral_lr_") and not r.is_baseline
                  and r.p_value is not None and r.p_value < 0.05 and r.delta > 0]
    numbers.update(best=rows[0].group, better=[r.group for r in better], worse=[r.group for r in worse],
                   better_than_perp=better_perp, worse_than_perp=worse_perp)
    perp_rows = [[r.group, f"{_f(r.mean)} ± {_f(r.std)}", "-" if r.delta is None else f"{r.delta:+.4f}",
                  "-" if r.p_value is None else f"{r.p_value:.3g}"]
                 for r in sorted(rows_perp, key=lambda r: r.group) if r.group.startswith("spectral_lr_")]
    cfg = by_tag[BASE][0].config
    scale = (f"{cfg['num_layers']} layers, width {cfg['model_dim']}, vocabulary {cfg['vocab_size']} (compact), "
             f"{cfg['num_scheduled_iterations']}+{cfg['num_extension_iterations']} steps of "
             f"{'/'.join(map(str, cfg['batch_sizes']))} tokens, {len(sizes.sweep_seeds)} seeds per group")
    four_rows = [[FOUR_WAY[r.group], r.group, r.n, f"{_f(r.mean)} ± {_f(r.std)}",
                  "-" if r.delta is None else f"{r.delta:+.4f}", "-" if r.p_value is None else f"{r.p_value:.3g}"]
                 for r in sorted(rows4, key=lambda r: list(FOUR_WAY).index(r.group))]
    sweep_text = f"""![final loss]({(d / 'final_loss.png').relative_to(out).as_posix()})
![val loss]({(d / 'val_loss_step.png').relative_to(out).as_posix()})

{PL.format_markdown(rows)}

Groups: `{BASE}` is train_gpt.py (Polar(G)); `spectral_lr_<s>` is the fork's ORD,
NorMuon(Polar(G - s G_par)) + s G_par with G in the fork's gradient units (the sum loss x
grad_scale; s = 0 is not run: through the ORD path it is `{BASE}` bit for bit, tests/test_ord.py); `{PERP}` is Polar(G_perp)
with nothing added back; `projected_mean_1` is this harness's ORD before the fork's code was read
(Polar(G - G_par) + G_par with G_par in mean-loss units, B/4 times smaller: it added almost nothing
back). Against Polar(G_perp) alone ({PERP} as the reference):

{markdown_table(["group", "final val loss", f"Δ vs {PERP}", "p (Welch)"], perp_rows)}
**The four-way comparison**

![four-way]({(d4 / 'final_loss.png').relative_to(out).as_posix()})
![four-way val loss]({(d4 / 'val_loss_step.png').relative_to(out).as_posix()})

{markdown_table(["update", "group", "n", "final val loss", "Δ vs Polar(G)", "p (Welch)"], four_rows)}
**rho over training** (`rho = <G,W>/||W||^2` and `||G_par||/||G||` per layer, logged at every
validation step; below, the mean over layers and seeds at the first such step after step 0 and at the last)

{_figures(d_rho, out)}

{markdown_table(["group", "rho first", "rho last", "‖G_par‖/‖G‖ first", "‖G_par‖/‖G‖ last"], rho_rows)}
**Answer.** Best group: {rows[0].group} ({_f(rows[0].mean)}; {BASE} {_f(base.mean)} ± {_f(base.std)}).
Significantly better than standard (Welch p < 0.05): {', '.join(r.group for r in better) or 'none'};
significantly worse: {', '.join(r.group for r in worse) or 'none'}. Scale: the tiny preset ({scale}), on
the local corpus; one CPU rank per run. With {len(sizes.sweep_seeds)} seeds a Welch test detects only
differences several times the seed spread, and 20-odd comparisons at p < 0.05 give about one false
positive by chance.
"""
    sweep = Section("The ORD sweep on the tiny preset", sweep_text, numbers)
    return sweep, weight_dynamics(out, by_tag[BASE])


def weight_dynamics(out: Path, standard: list) -> Section:
    """Alignment, entropy and stretching by depth, from the standard runs' diag lines."""
    from harness import plots as PL

    d = out / "weight_dynamics"
    first_seed = sorted(standard, key=lambda r: r.config["seed"])[:1]
    for metric in ("align_wdw", "w_entropy", "w_smax"):
        PL.plot_eff_rank(first_seed, d, metric=metric)
    metrics = ("align_wdw", "w_entropy", "w_smax")
    table: dict[int, dict[str, list[float]]] = {}
    for run in standard:
        steps = sorted({dg.step for dg in run.diags if math.isfinite(float(dg.values.get("align_wdw", math.nan)))})
        if not steps:
            continue
        lo, hi = steps[0], steps[-1]
        for b in sorted({_block_of(dg.layer) for dg in run.diags} - {None}):
            for m in metrics:
                for when, s in (("first", lo), ("last", hi)):
                    vals = [float(dg.values[m]) for dg in run.diags
                            if dg.step == s and _block_of(dg.layer) == b and m in dg.values]
                    table.setdefault(b, {}).setdefault(f"{m}_{when}", []).append(_mean(vals))
    rows, numbers = [], {}
    for b, cols in sorted(table.items()):
        numbers[b] = {k: _mean(v) for k, v in cols.items()}
        v = numbers[b]
        rows.append([b, f"{fmt(v['align_wdw_first'])} → {fmt(v['align_wdw_last'])}",
                     f"{fmt(v['w_entropy_first'])} → {fmt(v['w_entropy_last'])}", f"{fmt(v['w_smax_first'])} → {fmt(v['w_smax_last'])}"])
    deep = [numbers[b]["align_wdw_last"] for b in sorted(numbers)]
    avg = {k: _mean(v[k] for v in numbers.values()) for k in next(iter(numbers.values()), {})}
    text = f"""{_figures(d, out)}

{markdown_table(["block (depth)", "W/ΔW alignment, first → last", "spectral entropy of W", "σ_max(W)"], rows)}
Mean over each block's attention and MLP matrices and over the {len(standard)} standard runs, at the
first and last diagnostics step. Alignment: the mean cosine of the principal angles between the
top-k left singular subspaces of W and of the applied update ΔW (1 = the update acts in W's
dominant directions); entropy of σ(W)² normalised to [0, 1]; σ_max is the "stretching".

**Answer.** Averaged over depth, the W/ΔW alignment went from {fmt(avg.get('align_wdw_first'))} to
{fmt(avg.get('align_wdw_last'))} (block 0: {fmt(deep[0]) if deep else 'n/a'}, last block: {fmt(deep[-1]) if deep else 'n/a'} at the end),
the spectral entropy of W from {fmt(avg.get('w_entropy_first'))} to {fmt(avg.get('w_entropy_last'))}, and σ_max(W)
from {fmt(avg.get('w_smax_first'))} to {fmt(avg.get('w_smax_last'))}. The figures show every matrix over
training (first seed).
"""
    return Section("Update/weight alignment and spectral entropy by depth (standard NorMuon runs)", text,
                   {"by_block": numbers, "mean_over_depth": avg})


# ------------------------------------------------------------------------------------------
# The summary


def summary(sections: dict[str, Section]) -> str:
    lines = ["| question | answer at this scale | evidence |", "|---|---|---|"]
    gr = sections.get("gradient_rank")
    dg = sections.get("digits")
    rm = sections.get("rank_manipulation")
    ords = sections.get("ord_sweep")
    if gr:
        n = gr.numbers
        a, m = _rel(n["adam_start"], n["adam_end"]), _rel(n["muon_start"], n["muon_end"])
        moved = abs(a) > 0.1 or abs(m) > 0.1
        lines.append(f"| (1) Does the gradients' effective rank change during training? | {'yes' if moved else 'no'} "
                     f"| raw-gradient rank, mean of {n['layers']} matrices: Adam {fmt(n['adam_start'])} → {fmt(n['adam_end'])} "
                     f"({_pct(a)}), Muon {fmt(n['muon_start'])} → {fmt(n['muon_end'])} ({_pct(m)})"
                     + (f"; digits MLP: fell for {len(dg.numbers['fell'])}/3 optimizers" if dg else "") + " |")
        diff = _rel(n["adam_end"], n["muon_end"])
        ns_gap = _rel(n["adam_end"], n["ns_end"])
        lines.append(f"| (2) Do Adam and Muon differ in those dynamics? | {'yes' if abs(diff) > 0.1 or abs(ns_gap) > 0.5 else 'no'} "
                     f"| end of training: raw rank Adam {fmt(n['adam_end'])} vs Muon {fmt(n['muon_end'])} ({_pct(diff)}); "
                     f"Muon's update after NS {fmt(n['ns_end'])} of {n['width']}; val loss Adam {_f(n['adam_val'])} vs "
                     f"Muon {_f(n['muon_val'])} (one seed) |")
    if rm:
        n = rm.numbers
        lr = n["clear"].get("low_rank")
        lines.append(f"| (3) Does manipulating gradient rank change learning? | "
                     f"{'yes' if any(n['clear'].values()) else 'inconclusive'} | final val loss (mean of seeds): "
                     + ", ".join(f"{m} {_f(v)}" for m, v in n["mean"].items())
                     + f"; seed spread {_f(n['spread'])}; low_rank vs full {'clear' if lr else 'within noise'} |")
        eq, on = n["clear"].get("equalized"), n["clear"].get("orthonormal")
        m, full = n["mean"], n["mean"]["full"]
        sign = lambda mode: "helps" if m[mode] < full else "hurts"  # noqa: E731
        parts = []
        if eq or on:
            mode = "equalized" if eq else "orthonormal"
            parts.append(f"equalizing the spectrum ({sign(mode)} under Adam)")
        if lr:
            parts.append(f"cutting the rank ({sign('low_rank')})")
        verdict = " and ".join(parts) or "inconclusive"
        lines.append(f"| (4) Which part of orthogonalization matters? | {verdict} | the direction (singular vectors) is "
                     f"kept by every mode, so it is not isolated here; equalized/orthonormal vs full: "
                     f"{'clear' if (eq or on) else 'within noise'}; low_rank vs full: {'clear' if lr else 'within noise'}"
                     + (f"; Muon's NS lifts update rank to {fmt(gr.numbers['ns_end'])}" if gr else "") + " |")
    if ords:
        n = ords.numbers
        g = n["groups"]
        adds = [t for t in g if t.startswith("spectral_lr_") and t != "spectral_lr_0"]  # s > 0 adds back
        helped = [t for t in n["better"] if t in adds]
        hurt = [t for t in n["worse"] if t in adds]
        helped_perp = [t for t in n["better_than_perp"] if t in adds]
        best_add = min(adds, key=lambda t: g[t]["mean"]) if adds else None
        perp = g.get(PERP)
        if helped:
            ans = f"yes, at m = {', '.join(t.rsplit('_', 1)[1] for t in helped)}"
        elif helped_perp:
            ans = "only against Polar(G_perp) alone, not against the standard run"
        elif hurt and len(hurt) == len(adds):
            ans = "no"
        else:
            ans = "inconclusive"
        if best_add:
            lines.append(f"| ORD: does adding back m·G_par help, at which m? | {ans} | lowest mean: {best_add} "
                         f"({_f(g[best_add]['mean'])} vs standard {_f(g[BASE]['mean'])}, p {fmt(g[best_add]['p'])}); "
                         f"vs standard at p<0.05, better: {', '.join(helped) or 'none'}, worse: {', '.join(hurt) or 'none'}; "
                         f"vs Polar(G_perp), better: {', '.join(helped_perp) or 'none'}, worse: "
                         f"{', '.join(t for t in n['worse_than_perp'] if t in adds) or 'none'} |")
        if perp:
            verdict = ("worse" if PERP in n["worse"] else "better" if PERP in n["better"]
                       else "inconclusive")
            lines.append(f"| ORD: is Polar(G_perp) better or worse than Polar(G)? | {verdict} | "
                         f"{_f(perp['mean'])} ± {_f(perp['std'])} vs {_f(g[BASE]['mean'])} ± {_f(g[BASE]['std'])}, "
                         f"p {fmt(perp['p'])} |")
    return "\n".join(lines) + "\n"


def comparison_with_reference(sections: dict[str, Section]) -> str:
    out = []
    gr, dg, ords = sections.get("gradient_rank"), sections.get("digits"), sections.get("ord_sweep")
    if gr:
        n = gr.numbers
        out.append(f"- Seeds (docs/REFERENCE.md): in a 4-layer 256-wide GPT after 200 steps Muon's updates kept effective rank "
                   f"~230 of 256 against ~40-50 for Adam's raw gradients, and Muon's loss was 2.8% lower (6.83 vs 7.03). "
                   f"Here ({n['size']['num_layers']}x{n['size']['model_dim']}, {n['size']['steps']} steps): Muon after NS "
                   f"{fmt(n['ns_end'])} of {n['width']}, Adam raw {fmt(n['adam_end'])}; loss {_pct(_rel(n['adam_val'], n['muon_val']))} "
                   f"({_f(n['muon_val'])} vs {_f(n['adam_val'])}; our corpus is Python source, easier than web text, "
                   f"so the absolute losses are not comparable).")
    if dg:
        out.append(f"- Seeds: on MNIST the effective rank fell during training for every optimizer. Here, on the "
                   f"8x8 digits: it fell for {len(dg.numbers['fell'])} of {len(dg.numbers['arms'])} optimizers "
                   f"({', '.join(dg.numbers['fell']) or 'none'}).")
    if ords:
        g = ords.numbers["groups"]
        pieces = [f"{t} {_f(g[t]['mean'])}" + (" (= ORD at 0, bit for bit)" if t == BASE else "")
                  for t in (BASE, "spectral_lr_0.1", "spectral_lr_1") if t in g]
        out.append("- The seed experiment's fork (8xH100, 124M, 1600 steps): standard 3.2705, ORD at 0 3.2727, ORD at 1 "
                   f"3.4093 (ORD 1 clearly worse, ORD 0 about equal). Here: {', '.join(pieces)}.")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------
# The whole report


def ensure_corpus(data: Path) -> None:
    if list(data.glob("local_train_*.bin")) and list(data.glob("local_val_*.bin")):
        return
    from data.prepare_corpus import prepare_corpus

    print(f"no shards in {data}: preparing the local corpus (python -m data.prepare_corpus)", flush=True)
    prepare_corpus(out_dir=data, progress=False)


def run_records(log_dir: Path) -> list[dict]:
    from harness.logs.format import find_logs, read_log

    recs = []
    for p in find_logs([log_dir]):
        log = read_log(p)
        recs.append({"run_id": log.run_id, "tag": log.tag, "seed": (log.config or {}).get("seed"),
                     "status": log.status, "final_val_loss": log.final_val_loss,
                     "git_commit": log.env.get("git_commit"), "config": log.config})
    return recs


def _run_study(name: str, out: Path, sizes: Sizes, data: Path, jobs: int = 1) -> tuple[dict[str, Section], float]:
    """One section, in this process (a worker of make_report's pool, or the main one); returns
    its sections and the seconds it took."""
    import torch

    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    print(f"== {name}", flush=True)
    if name == "gradient_rank":
        got = {"gradient_rank": study_gradient_rank(out, sizes)}
    elif name == "digits":
        got = {"digits": study_digits(out, sizes)}
    elif name == "rank_manipulation":
        got = {"rank_manipulation": study_rank_manipulation(out, sizes)}
    elif name == "gradient_snr":
        got = {"gradient_snr": study_gradient_snr(out, sizes)}
    else:
        got = dict(zip(("ord_sweep", "weight_dynamics"), study_ord_sweep(out, sizes, data, jobs)))
    seconds = time.perf_counter() - t0
    print(f"== {name}: {seconds:.0f}s", flush=True)
    return got, seconds


def make_report(out: Path, quick: bool = False, only: Sequence[str] = SECTIONS, data: Path | None = None,
                jobs: int = JOBS) -> Path:
    import torch

    torch.set_num_threads(THREADS)
    os.environ["OMP_NUM_THREADS"] = str(THREADS)  # the workers and the sweep's runs inherit it
    sizes = QUICK if quick else FULL
    data = (data or ROOT / "data" / "local").resolve()
    out = out.resolve()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: the report folder exists and is not empty (choose another --out)")
    out.mkdir(parents=True, exist_ok=True)
    ensure_corpus(data)
    t_all = time.perf_counter()
    sections: dict[str, Section] = {}
    seconds: dict[str, float] = {}
    lm = {**sizes.lm, "data": str(data)}
    small = {**sizes.small, "data": str(data)}
    sizes = replace(sizes, lm=lm, small=small)
    # The in-process studies run `jobs` at a time in fresh processes (spawned: a forked torch can
    # hang in OpenMP) while the ORD sweep runs `jobs` runs at a time in this process's launcher
    # (it handles signals, so it needs the main thread): 2 x jobs one-thread processes share the
    # cores, and no core idles while the longest study finishes alone.
    studies = [n for n in STUDY_ORDER if n in only]
    pool = futures = None
    if jobs > 1 and studies:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(max_workers=min(jobs, len(studies)), mp_context=mp.get_context("spawn"))
        futures = {n: pool.submit(_run_study, n, out, sizes, data) for n in studies}
    else:
        for n in studies:
            got, seconds[n] = _run_study(n, out, sizes, data)
            sections.update(got)
    try:
        if "ord_sweep" in only:
            got, seconds["ord_sweep"] = _run_study("ord_sweep", out, sizes, data, jobs)
            sections.update(got)
        for n, f in (futures or {}).items():
            got, seconds[n] = f.result()
            sections.update(got)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    minutes = (time.perf_counter() - t_all) / 60

    commit, dirty = _git("rev-parse", "HEAD"), bool(_git("status", "--porcelain", "--untracked-files=no"))
    runs = run_records(out / "runs") if (out / "runs").is_dir() else []
    meta = {"commit": commit, "dirty": dirty, "quick": quick, "sections": list(only), "python": platform.python_version(),
            "torch": torch.__version__, "threads": THREADS, "jobs": jobs,
            "section_seconds": seconds, "machine": platform.machine(), "cpus": os.cpu_count(),
            "sizes": asdict(sizes), "sweep_file": SWEEP_FILE.relative_to(ROOT).as_posix(), "minutes": minutes}
    atomic_write(out / "runs.json", json.dumps(_json_safe({**meta, "runs": runs}), indent=1))
    atomic_write(out / "results.json", json.dumps(_json_safe({name: s.numbers for name, s in sections.items()}), indent=1, sort_keys=True))

    order = ("gradient_rank", "digits", "rank_manipulation", "gradient_snr", "weight_dynamics", "ord_sweep")
    body = []
    for i, name in enumerate([n for n in order if n in sections], 1):
        s = sections[name]
        body.append(f"## {i}. {s.title}\n\n{s.text.strip()}\n")
    text = f"""# Research report: why orthogonalized updates help, and does ORD?

Generated by `python -m experiments.report{' --quick' if quick else ''}` at commit `{commit[:12]}`{' (dirty tree)' if dirty else ''}
in {minutes:.0f} minutes on {os.cpu_count()} CPU cores (torch {torch.__version__}; {f"the studies {jobs} at a time beside the ORD sweep's runs {jobs} at a time" if jobs > 1 else "one study or sweep run at a time"},
{THREADS} thread each; wall minutes per section{", overlapping" if jobs > 1 else ""}:
{', '.join(f"{k} {v / 60:.1f}" for k, v in seconds.items())}).
{'**Quick mode: toy sizes that test the pipeline; the numbers answer nothing.**' if quick else ''}

Everything here is CPU scale: GPTs of a few million parameters trained for a few hundred
thousand tokens on the local corpus (the Python standard library's sources, GPT-2 tokens
renumbered to a compact vocabulary), and an MLP on 8x8 digits. These runs can show what the
spectral quantities do and whether an effect is large; they cannot say what happens at 124M
parameters and billions of tokens. Seeds, commit and the resolved config of every run:
`runs.json`; every number below: `results.json`.

## Summary

{summary(sections)}
**Against docs/REFERENCE.md**

{comparison_with_reference(sections)}
{chr(10).join(body)}
## Reproducing

`python -m experiments.report` (or `make report`) writes a new `reports/<timestamp>/`. The
sweep alone: `python launch_lr_sweep.py sweeps/report_ord.toml`; any study alone:
`python -m experiments.<name> --out DIR` (see `--help`). Same machine, same numbers: every
run is seeded, single-process per run, with {THREADS} thread; `--jobs N` runs N studies and N sweep
runs side by side (default {JOBS}) without changing a number.
"""
    atomic_write(out / "REPORT.md", text)
    return out / "REPORT.md"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy sizes, 2 seeds: the whole pipeline in a few minutes")
    p.add_argument("--out", help="report folder (default reports/<timestamp>)")
    p.add_argument("--only", help=f"comma-separated sections (default all: {','.join(SECTIONS)})")
    p.add_argument("--jobs", type=int, default=JOBS,
                   help=f"studies and sweep runs side by side, one thread each (default {JOBS}; the numbers do not depend on it)")
    p.add_argument("--data", help="folder of local_train_*/local_val_* shards (default data/local; built if missing)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    only = SECTIONS if not args.only else tuple(s.strip() for s in args.only.split(",") if s.strip())
    bad = [s for s in only if s not in SECTIONS]
    if bad or not only:
        raise UserError(f"--only {args.only!r}: allowed sections: {', '.join(SECTIONS)}")
    out = Path(args.out) if args.out else ROOT / "reports" / time.strftime("%Y%m%d-%H%M%S")
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: allowed: an integer >= 1")
    path = make_report(out, quick=args.quick, only=only, data=Path(args.data) if args.data else None, jobs=args.jobs)
    print(f"report: {path}", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
