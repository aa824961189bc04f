"""The in-run instrument, in process at world size 1: its numbers against the spectral metrics
computed independently from the same step, the sample, the spectra file, the embed/head path."""

import math

import numpy as np
import pytest
import torch

from harness import dist as hdist
from harness import spectral as sp
from harness.config import Config
from harness.diagnostics import ADAM_METRICS, MUON_METRICS, SPECTRUM_KINDS, SpectralDiagnostics
from harness.model import GPT, ModelShape
from harness.optim import Optimizers
from kernels import orthogonalize

INFO = hdist.DistInfo(0, 1, 0, torch.device("cpu"), None)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def setup(tmp_path, **kw):
    cfg = Config(num_layers=1, model_dim=32, num_heads=2, vocab_size=128, diag_every=1, diag_topk=4,
                 log_dir=str(tmp_path), run_id="t", **kw)
    torch.manual_seed(0)
    model = GPT(ModelShape.from_config(cfg))
    with torch.no_grad():  # non-zero output projections and head, so every gradient is non-zero
        for p in model.parameters():
            if p.ndim == 2 and p.abs().max() == 0:
                p.normal_(0, 0.05)
    opt = Optimizers(model, cfg, INFO)
    return cfg, model, opt, SpectralDiagnostics(cfg, INFO, opt, model)


def one_step(model, opt, diag, step=0):
    x = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(step))
    model(x, x.roll(-1, 1)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if diag is not None:
        diag.begin(step)
    opt.step(step, 1.0, 0.9)
    if diag is not None:
        diag.end(step)
    opt.zero_grad()
    return grads, before


def test_muon_metrics_match_an_independent_computation(tmp_path):
    cfg, model, opt, diag = setup(tmp_path)
    grads, before = one_step(model, opt, diag)
    records = {layer: m for _, layer, m in diag.take_records()}
    refs = {r.name: r for g in opt.muon.groups for r in g.refs}
    assert set(records) == set(refs)
    for name, r in refs.items():
        m = records[name]
        assert list(m) == list(MUON_METRICS)
        pname = next(n for n, p in model.named_parameters() if p is r.param)
        sl = lambda t, r=r: t.view(-1, *r.shape)[r.index]  # noqa: E731 - this matrix of its parameter
        grad, W0, W1 = sl(grads[pname]), sl(before[pname]), r.weight().detach()
        # first step: momentum buffer = (1 - mu) g, Nesterov G = g.lerp(buf, mu)
        G = grad.lerp(grad * 0.1, 0.9)
        O = orthogonalize(G)
        assert m["eff_rank"] == pytest.approx(sp.effective_rank(grad).item(), rel=1e-4)
        assert m["top5"] == pytest.approx(sp.topk_mass(grad, 5).item(), rel=1e-4)
        assert m["fro"] == pytest.approx(grad.norm().item(), rel=1e-4)
        assert m["cond"] == pytest.approx(sp.condition_number(grad).item(), rel=1e-3)
        assert m["eff_rank_mom"] == pytest.approx(sp.effective_rank(G).item(), rel=1e-4)
        assert m["eff_rank_ns"] == pytest.approx(sp.effective_rank(O).item(), rel=1e-4)
        eff = sp.ns_effect(G, O)
        assert m["ns_angle_deg"] == pytest.approx(eff.angle_deg.item(), rel=1e-4)
        assert m["ns_rel_loss_scaled"] == pytest.approx(eff.rel_loss_scaled.item(), rel=1e-4)
        assert m["rank_ratio"] == pytest.approx(sp.effective_rank(O).item() / sp.effective_rank(G).item(), rel=1e-4)
        assert m["align_wdw"] == pytest.approx(sp.subspace_alignment(W0, W1 - W0, 4).item(), rel=1e-4)
        assert m["w_entropy"] == pytest.approx(sp.spectral_entropy(W0).item(), rel=1e-4)
        assert m["w_smax"] == pytest.approx(sp.singular_values(W0)[0].item(), rel=1e-5)
        assert m["dw_fro"] == pytest.approx((W1 - W0).norm().item(), rel=1e-4)
        # orthogonalization raises the effective rank of these low-rank gradients
        assert m["eff_rank_ns"] > m["eff_rank_mom"] and m["rank_ratio"] > 1
    # a second step: now the momentum gradient is no longer a multiple of the raw one, so the
    # rank ratio must be taken against G (the NS input), not the raw gradient
    grads2, _ = one_step(model, opt, diag, step=1)
    records2 = {layer: m for s, layer, m in diag.take_records() if s == 1}
    assert set(records2) == set(refs)
    for name, r in refs.items():
        m = records2[name]
        pname = next(n for n, p in model.named_parameters() if p is r.param)
        sl = lambda t, r=r: t.view(-1, *r.shape)[r.index]  # noqa: E731
        g1, g2 = sl(grads[pname]), sl(grads2[pname])
        buf = (g1 * 0.1).lerp(g2, 0.1)  # momentum 0.9: buf_t = buf_{t-1}.lerp(g_t, 1 - mu)
        G2 = g2.lerp(buf, 0.9)
        assert m["eff_rank"] == pytest.approx(sp.effective_rank(g2).item(), rel=1e-4)
        assert m["eff_rank_mom"] == pytest.approx(sp.effective_rank(G2).item(), rel=1e-4)
        assert abs(m["eff_rank_mom"] - m["eff_rank"]) > 1e-3  # the case this step is here for
        assert m["rank_ratio"] == pytest.approx(sp.effective_rank(orthogonalize(G2)).item()
                                                / sp.effective_rank(G2).item(), rel=1e-4)


def test_diagnostics_do_not_change_the_step(tmp_path):
    _, m1, o1, d1 = setup(tmp_path, diag_embed_head=True, diag_spectra=True)
    _, m2, o2, _ = setup(tmp_path)
    for step in range(3):
        one_step(m1, o1, d1, step)
        one_step(m2, o2, None, step)
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(a, b), n
    assert o1.muon.inspect is None


def test_sample_is_fixed_by_the_seed(tmp_path):
    _, _, _, a = setup(tmp_path, diag_sample=3)
    _, _, _, b = setup(tmp_path, diag_sample=3)
    _, _, _, everything = setup(tmp_path, diag_sample=100)
    assert len(a.selected) == 3 and a.selected == b.selected
    assert len(everything.selected) == 6  # q, k, v, attn proj, fc, mlp proj
    cfg, model, opt, diag = setup(tmp_path, diag_sample=2)
    one_step(model, opt, diag)
    assert {layer for _, layer, _ in diag.take_records()} == diag.selected


def test_embed_head_and_spectra_file(tmp_path):
    cfg, model, opt, diag = setup(tmp_path, diag_embed_head=True, diag_spectra=True, diag_sample=2)
    grads, before = one_step(model, opt, diag, 0)
    one_step(model, opt, diag, 1)
    records = [(s, layer, m) for s, layer, m in diag.history]
    head = [m for s, layer, m in records if layer == "lm_head.weight"]
    assert len(head) == 2 and list(head[0]) == list(ADAM_METRICS)
    assert head[0]["eff_rank"] == pytest.approx(sp.effective_rank(grads["lm_head.weight"]).item(), rel=1e-4)
    assert head[0]["w_smax"] == pytest.approx(sp.singular_values(before["lm_head.weight"])[0].item(), rel=1e-5)
    assert any(layer == "embed.weight" for _, layer, _ in records)
    z = np.load(tmp_path / "t.spectra.npz")
    assert z["steps"].tolist() == [0, 1]
    for name in diag.selected:
        for kind in SPECTRUM_KINDS:
            s = z[f"{name}:{kind}"]
            assert s.shape == (2, 32) and np.all(np.diff(s, axis=1) <= 1e-6)  # descending
    s0 = z["lm_head.weight:grad"][0]
    assert s0 == pytest.approx(sp.singular_values(grads["lm_head.weight"]).numpy(), rel=1e-4, abs=1e-7)
    assert not list(tmp_path.glob(".*tmp"))  # written through a temp file, replaced atomically


def test_zero_gradient_metrics_are_nan_not_errors(tmp_path):
    cfg, model, opt, diag = setup(tmp_path)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    diag.begin(0)
    opt.step(0, 1.0, 0.9)
    diag.end(0)
    for _, _, m in diag.take_records():
        assert math.isnan(m["eff_rank"]) and m["fro"] == 0.0


def test_under_ord_the_ns_effect_is_measured_on_what_is_orthogonalized(tmp_path):
    from harness.optim import ord_split

    cfg, model, opt, diag = setup(tmp_path, ord=True, spectral_lr_mul=0.5)
    grads, before = one_step(model, opt, diag)
    records = {layer: m for _, layer, m in diag.take_records()}
    r = next(r for g in opt.muon.groups for r in g.refs if r.name.endswith("mlp.fc.weight"))
    grad, W0 = grads[r.name], before[r.name]
    G = grad.lerp(grad * 0.1, 0.9)
    _, G_par = ord_split(G, W0, cfg.spectral_proj_eps)
    G_perp = G - 0.5 * G_par  # the fork's interpolated form at s = 0.5: Polar(G - s G_par)
    O = orthogonalize(G_perp)
    m = records[r.name]
    assert m["ns_angle_deg"] == pytest.approx(sp.ns_effect(G_perp, O).angle_deg.item(), rel=1e-4)
    assert m["rank_ratio"] == pytest.approx(m["eff_rank_ns"] / sp.effective_rank(G_perp).item(), rel=1e-4)
    assert m["eff_rank_mom"] == pytest.approx(sp.effective_rank(G).item(), rel=1e-4)
