"""The in-run spectral instrument: gradient, Newton-Schulz and weight/update metrics every N steps.

With `--diag_every N` (0 = off), at training steps 0, N, 2N, ... every Muon matrix (or a fixed
random sample of `--diag_sample` of them) is measured on the rank that owns it, inside the
optimizer step (ShardedMuon.inspect), from what the step computes anyway:

- raw reduced gradient:           eff_rank top1 top5 top10 cond fro
- after momentum (Nesterov) G:    the same with suffix _mom
- after orthogonalization:        the same with suffix _ns
- the update (after NorMuon/ORD): eff_rank_upd top1_upd
- Newton-Schulz effect (input vs output): ns_angle_deg ns_rel_loss ns_rel_loss_scaled, and
  rank_ratio = eff_rank_ns / eff_rank of the NS input (G; G_perp under ORD)
- weight and applied change ΔW:   align_wdw (mean principal-angle cosine of the top-k left
  singular subspaces, k = --diag_topk), w_entropy, w_smax, w_eff_rank, dw_fro, dw_rel (|ΔW|/|W|)

Each rank fills one fixed-size row per matrix of its share (nan for matrices not sampled and
for padding); one all_gather per shape group brings the rows to every rank, and rank 0 logs
`diag step:N layer:NAME key:value ...` (N is the index of the step whose gradient was measured,
as for the ORD statistics). With `--diag_embed_head` the embeddings and the head (Adam, the same
on every rank) are measured on rank 0: gradient block, weight block and alignment (no NS).
With `--diag_spectra` the full singular-value spectra (grad, mom, ns, upd, w) go to
`<log_dir>/<run_id>.spectra.npz`, rewritten atomically at every diagnostics step.

Only singular values are computed (svdvals) except for the alignment, which needs left singular
vectors of W and ΔW. Nothing here writes to the model, the optimizer state or any RNG, so a run
with diagnostics follows the same trajectory, bit for bit, as one without.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import numpy as np
import torch

from base import atomic_write
from harness import dist as hdist
from harness import spectral as sp
from harness.config import Config
from harness.optim import MuonGroup, Optimizers

TOPK_MASS = (1, 5, 10)
SPECTRUM_KINDS = ("grad", "mom", "ns", "upd", "w")  # rows of the .spectra.npz file per layer


def _block(suffix: str) -> tuple[str, ...]:
    return (f"eff_rank{suffix}", *(f"top{k}{suffix}" for k in TOPK_MASS), f"cond{suffix}", f"fro{suffix}")


MUON_METRICS: tuple[str, ...] = (
    *_block(""), *_block("_mom"), *_block("_ns"), "eff_rank_upd", "top1_upd",
    "ns_angle_deg", "ns_rel_loss", "ns_rel_loss_scaled", "rank_ratio",
    "align_wdw", "w_entropy", "w_smax", "w_eff_rank", "dw_fro", "dw_rel",
)
ADAM_METRICS: tuple[str, ...] = (*_block(""), "align_wdw", "w_entropy", "w_smax", "w_eff_rank", "dw_fro", "dw_rel")


def weight_metrics(W: torch.Tensor, dW: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """align_wdw, w_entropy, w_smax, w_eff_rank, dw_fro, dw_rel per matrix of a batch, and σ(W)."""
    Uw, sw = sp.top_left_subspace(W, k)
    Ud, sd = sp.top_left_subspace(dW, k)
    align = sp.principal_angle_cosines(Uw, Ud).mean(-1)
    live = torch.minimum(sw[..., 0], sd[..., 0]) > 0
    dw_fro = sd.square().sum(-1).sqrt()
    w_fro = sw.square().sum(-1).sqrt()
    nan = torch.full_like(align, float("nan"))
    return {
        "align_wdw": torch.where(live, align, nan),
        "w_entropy": sp.spectral_entropy_sv(sw),
        "w_smax": sw[..., 0],
        "w_eff_rank": sp.effective_rank_sv(sw),
        "dw_fro": dw_fro,
        "dw_rel": torch.where(w_fro > 0, dw_fro / w_fro.clamp_min(1e-30), nan),
        "_sv_w": sw,
    }


def muon_metrics(probe: dict[str, torch.Tensor], k: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The MUON_METRICS of a batch of matrices from one inspection probe, and their spectra."""
    shape, dtype = probe["grad"].shape, torch.float32
    rtol = sp.default_rtol(tuple(shape), dtype)
    sv = {
        "grad": sp.singular_values(probe["grad"]),
        "mom": sp.singular_values(probe["G"]),
        "ns": sp.singular_values(probe["ns_out"]),
        "upd": sp.singular_values(probe["update"]),
    }
    out: dict[str, torch.Tensor] = {}
    out.update(sp.spectrum_summary(sv["grad"], TOPK_MASS, rtol))
    out.update(sp.spectrum_summary(sv["mom"], TOPK_MASS, rtol, suffix="_mom"))
    out.update(sp.spectrum_summary(sv["ns"], TOPK_MASS, rtol, suffix="_ns"))
    out["eff_rank_upd"] = sp.effective_rank_sv(sv["upd"])
    out["top1_upd"] = sp.topk_mass_sv(sv["upd"], 1)
    eff = sp.ns_effect(probe["ns_in"], probe["ns_out"])
    out["ns_angle_deg"], out["ns_rel_loss"], out["ns_rel_loss_scaled"] = eff
    ns_in_sv = sv["mom"] if probe["ns_in"] is probe["G"] else sp.singular_values(probe["ns_in"])
    out["rank_ratio"] = out["eff_rank_ns"] / sp.effective_rank_sv(ns_in_sv)
    wm = weight_metrics(probe["W"], probe["dW"], k)
    sv["w"] = wm.pop("_sv_w")
    out.update(wm)
    return out, sv


@contextlib.contextmanager
def lapack_threads(device: torch.device):
    """One CPU thread for the decompositions: LAPACK on batches of small matrices gains little
    from threads and loses several-fold when the cores are shared (measured: 5-10x slower with
    2 threads on a busy 2-core machine). The training's own thread count is restored after."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class SpectralDiagnostics:
    """Arms the optimizer's inspection hook at diagnostics steps and gathers the metrics."""

    def __init__(self, cfg: Config, info: hdist.DistInfo, opt: Optimizers, model: torch.nn.Module):
        self.cfg, self.info, self.opt = cfg, info, opt
        self.every = cfg.diag_every
        self.k = cfg.diag_topk
        names = [r.name for g in opt.muon.groups for r in g.refs]
        if 0 < cfg.diag_sample < len(names):
            # the same sample on every rank and in every run with this seed; never the global RNG
            names = random.Random(cfg.seed).sample(sorted(names), cfg.diag_sample)
        self.selected = set(names)
        self.spectra = cfg.diag_spectra
        self.spectra_path = Path(cfg.log_dir) / f"{cfg.run_id}.spectra.npz"
        labels = {s.name: s.label for s in model.param_specs()}
        self.adam_params = [(n, p) for n, p in model.named_parameters()
                            if cfg.diag_embed_head and labels[n] in ("embed", "value_embed", "lm_head") and p.ndim == 2]
        self.columns = {g: self._width(g) for g in range(len(opt.muon.groups))}
        self._rows: dict[int, torch.Tensor] = {}
        self._before: dict[str, torch.Tensor] = {}
        self.records: list[tuple[int, str, dict[str, float]]] = []  # the last step's (rank 0)
        self.history: list[tuple[int, str, dict[str, float]]] = []  # every step's (rank 0)
        self._spectra: dict[str, list[np.ndarray]] = {}
        self._spectra_steps: list[int] = []

    def _width(self, gi: int) -> int:
        m, n = self.opt.muon.groups[gi].shape
        return len(MUON_METRICS) + (len(SPECTRUM_KINDS) * min(m, n) if self.spectra else 0)

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    # --- the step -------------------------------------------------------------------------
    def begin(self, step: int) -> None:
        """Before the optimizer step of a diagnostics step."""
        self._rows = {}
        self.opt.muon.inspect = self._inspect
        if self.info.is_main:
            self._before = {n: p.detach().float().clone() for n, p in self.adam_params}

    @torch.no_grad()
    def _inspect(self, g: MuonGroup, probe: dict[str, torch.Tensor]) -> None:
        gi = self.opt.muon.groups.index(g)
        rows = torch.full((g.per_rank, self.columns[gi]), float("nan"), dtype=torch.float32,
                          device=probe["grad"].device)
        picked = [j for j, i in enumerate(g.owned) if g.refs[i].name in self.selected]
        if picked:
            with lapack_threads(rows.device):
                self._fill(rows, picked, probe)
        self._rows[gi] = rows

    def _fill(self, rows: torch.Tensor, picked: list[int], probe: dict[str, torch.Tensor]) -> None:
        idx = torch.tensor(picked, device=rows.device)
        sub = {key: t.index_select(0, idx).float() for key, t in probe.items()}
        sub["ns_in"] = sub["G"] if probe["ns_in"] is probe["G"] else sub["ns_in"]
        metrics, sv = muon_metrics(sub, self.k)
        values = [metrics[name] for name in MUON_METRICS]
        if self.spectra:
            values += [sv[kind] for kind in SPECTRUM_KINDS]
        rows[idx] = torch.cat([v.reshape(len(picked), -1) for v in values], dim=1)

    @torch.no_grad()
    def end(self, step: int) -> None:
        """After the optimizer step (before zero_grad): gather to rank 0 and keep the records.
        A collective at diagnostics steps: every rank calls it."""
        self.opt.muon.inspect = None
        records: list[tuple[int, str, dict[str, float]]] = []
        spectra: dict[str, np.ndarray] = {}
        for gi, g in enumerate(self.opt.muon.groups):
            rows = self._rows.get(gi)
            if rows is None:
                raise RuntimeError(f"diagnostics: the optimizer did not inspect Muon group {g.shape}")
            full = torch.empty(g.padded, rows.size(1), dtype=rows.dtype, device=rows.device)
            full = hdist.all_gather_async(full, rows)().cpu()
            if not self.info.is_main:
                continue
            r = min(g.shape)
            nm = len(MUON_METRICS)
            for i, ref in enumerate(g.refs):
                if ref.name not in self.selected:
                    continue
                records.append((step, ref.name, dict(zip(MUON_METRICS, full[i, :nm].tolist()))))
                if self.spectra:
                    for c, kind in enumerate(SPECTRUM_KINDS):
                        spectra[f"{ref.name}:{kind}"] = full[i, nm + c * r: nm + (c + 1) * r].numpy()
        self._rows = {}
        if self.info.is_main:
            for name, p in self.adam_params:
                W0 = self._before.pop(name)
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                with lapack_threads(p.device):
                    metrics = self._adam_metrics(grad.float(), W0, p.detach().float(), spectra, name)
                records.append((step, name, metrics))
            self.records = records
            self.history.extend(records)
            if self.spectra:
                self._save_spectra(step, spectra)

    def _adam_metrics(self, grad, W0, W1, spectra, name) -> dict[str, float]:
        s = sp.singular_values(grad)
        out = sp.spectrum_summary(s, TOPK_MASS, sp.default_rtol(tuple(grad.shape), torch.float32))
        wm = weight_metrics(W0, W1 - W0, self.k)
        sw = wm.pop("_sv_w")
        out.update(wm)
        if self.spectra:
            spectra[f"{name}:grad"] = s.cpu().numpy()
            spectra[f"{name}:w"] = sw.cpu().numpy()
        return {key: float(out[key]) for key in ADAM_METRICS}

    def take_records(self) -> list[tuple[int, str, dict[str, float]]]:
        out, self.records = self.records, []
        return out

    # --- spectra side file ----------------------------------------------------------------
    def _save_spectra(self, step: int, spectra: dict[str, np.ndarray]) -> None:
        """Append this step's spectra and rewrite the .npz atomically: `steps` (n,) and one
        (n, r) float32 array per `layer:kind` (nan rows where a layer was not measured)."""
        n_before = len(self._spectra_steps)
        self._spectra_steps.append(step)
        for key, s in spectra.items():
            rows = self._spectra.setdefault(key, [np.full(len(s), np.nan, np.float32)] * n_before)
            rows.append(s.astype(np.float32))
        for rows in self._spectra.values():
            if len(rows) < len(self._spectra_steps):
                rows.append(np.full(len(rows[-1]), np.nan, np.float32))
        arrays = {"steps": np.asarray(self._spectra_steps, dtype=np.int64)}
        arrays.update({key: np.stack(rows) for key, rows in self._spectra.items()})

        def write(tmp: Path) -> None:
            with open(tmp, "xb") as f:  # a file object: given a path, np.savez would append .npz
                np.savez(f, **arrays)

        atomic_write(self.spectra_path, write)
