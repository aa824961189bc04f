"""SpeedrunGPT's own behaviour (the fork parity is in test_speedrun_model_parity.py), and the
parameter tables of both models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from harness.model import GPT, ModelShape
from harness.params import MUON_LABELS, ParamSpec
from harness.speedrun_model import (ForwardArgs, SpeedrunFeatures, SpeedrunGPT, SpeedrunLayout, YarnRope, _flex, _sdpa,
                                    attention_mask, block_mask, document_ids, mtp_loss)

TINY = dict(vocab_size=128, num_layers=11, model_dim=48, num_heads=4, head_dim=12, bigram_vocab_size=97,
            max_seq_len=64)


def _check_table(model, specs: list[ParamSpec]) -> dict[str, ParamSpec]:
    params = dict(model.named_parameters())
    by_name = {s.name: s for s in specs}
    assert len(by_name) == len(specs) and set(by_name) == set(params)  # each parameter once
    for s in specs:
        if s.label in MUON_LABELS:
            stack = params[s.name].view(-1, *s.matrix_shape)  # the declared split is a view
            assert stack.size(0) == len(s.matrices)
    return by_name


def test_speedrun_param_table():
    m = SpeedrunGPT(**TINY)
    specs = _check_table(m, m.param_specs())
    attn = specs["attn_bank"]
    assert attn.label == "attn" and attn.matrix_shape == (48, 48)
    assert [x.role for x in attn.matrices[:4]] == ["attn_q", "attn_k", "attn_v", "attn_o"]
    assert len(attn.matrices) == 4 * 10  # ten attention layers: layer 6 has none
    assert "blocks.6.attn.q" not in {x.name for x in attn.matrices}
    assert attn.matrices[4 * 6].name == "blocks.7.attn.q"
    mlp = specs["mlp_bank"]
    assert mlp.matrix_shape == (4 * 48, 48)
    assert [x.role for x in mlp.matrices] == ["mlp_fc", "mlp_proj"] * 11 + ["pad", "pad"]
    # the matrices are where the forward reads them: q of layer 7 is rows 0..d of bank slot 6
    assert torch.equal(m.attn_bank.view(-1, 48, 48)[4 * 6], m.attn_bank[6, :48])
    assert torch.equal(m.mlp_bank.view(-1, 192, 48)[2 * 3 + 1], m.mlp_bank[3, 1])
    labels = {n: s.label for n, s in specs.items() if s.label not in MUON_LABELS}
    assert labels == {"smear_gate.weight": "smear_gate", "skip_gate.weight": "skip_gate",
                      "value_embeds": "value_embed", "attn_gate_bank": "attn_gate_bank",
                      "ve_gate_bank": "ve_gate_bank", "lm_head": "lm_head", "embed.weight": "embed",
                      "bigram_embed.weight": "bigram_embed", "x0_lambdas": "x0_lambdas", "scalars": "scalars"}


def test_old_gpt_param_table_agrees_with_its_roles():
    shape = ModelShape(vocab_size=128, num_layers=4, model_dim=32, num_heads=4, mlp_ratio=4, window_size=0,
                       rope=True, rope_base=10000.0, qk_norm=True, logit_softcap=15.0, value_embeds=True,
                       unet_skips=True)
    m = GPT(shape)
    specs = _check_table(m, m.param_specs())
    roles = m.param_roles()
    expect = {"muon": None, "embed": ("embed", "value_embed"), "head": ("lm_head",), "scalar": ("scalars",)}
    for name, role in roles.items():
        if role == "muon":
            assert specs[name].label in MUON_LABELS
            assert [x.name for x in specs[name].matrices] == m.matrix_names(name, dict(m.named_parameters())[name])
        else:
            assert specs[name].label in expect[role]
    qkv = specs["blocks.0.attn.qkv"]
    assert [x.role for x in qkv.matrices] == ["attn_q", "attn_k", "attn_v"]
    assert specs["blocks.0.attn.proj.weight"].matrices[0].role == "attn_o"
    assert specs["blocks.0.mlp.proj.weight"].matrices[0].role == "mlp_proj"
    assert specs["value_embeds.0.weight"].label == "value_embed"


def test_initialisation_is_the_forks():
    m = SpeedrunGPT(**TINY)
    assert torch.equal(m.embed.weight, m.lm_head.T)
    assert m.lm_head.std().item() == pytest.approx(0.005, rel=0.1)
    for p in (m.value_embeds, m.bigram_embed.weight, m.attn_gate_bank, m.ve_gate_bank, m.mlp_bank[:, 1]):
        assert not p.any()
    bound = math.sqrt(3) * 0.5 * 48 ** -0.5
    assert m.attn_bank.abs().max() <= bound
    L = 11
    assert torch.equal(m.scalars[:L], torch.full((L,), 1.1))
    assert m.scalars[4 * L:].tolist() == pytest.approx([0.0, 0.5, -1.5])
    assert m.tied_embed_head() == (m.embed.weight, m.lm_head)


def test_initial_loss_is_near_uniform():
    m = SpeedrunGPT(**TINY).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 128, (2, 32), generator=g)
    cu = torch.tensor([0, 32, 32, 32], dtype=torch.int32)
    loss = m(x, y, cu, x % 96, ForwardArgs(torch.tensor([1.0]), 8, 16))
    # head N(0, 0.005): logits near 0, soft-capped to near a constant: near-uniform predictions
    # (the tied start favours the input token itself a little, so not the target y)
    assert loss.item() == pytest.approx(math.log(128), abs=0.1)


def test_bad_sizes_are_one_clear_line():
    with pytest.raises(ValueError, match=r"num_layers=8 has no built-in layer layout; allowed: 11"):
        SpeedrunGPT(**{**TINY, "num_layers": 8})
    with pytest.raises(ValueError, match=r"num_heads x head_dim = 4 x 10 must equal model_dim=48"):
        SpeedrunGPT(**{**TINY, "head_dim": 10})
    bad = SpeedrunLayout(windows=("short", None, "long"), paired=(1,), ve_layers=(0, 1, 2, 0, 2), skip_from=0,
                         skip_to=2, backout_layer=1)
    with pytest.raises(ValueError, match=r"ve_layers=\(0, 1, 2, 0, 2\) must be distinct"):
        bad.validate()


def test_a_custom_layout_runs_at_another_depth():
    lay = SpeedrunLayout(windows=("short", "long", None, "short", "short", "long"), paired=(0, 3),
                         ve_layers=(0, 1, 3, 4, 5), skip_from=1, skip_to=2, backout_layer=3)
    m = SpeedrunGPT(**{**TINY, "num_layers": 6}, layout=lay)
    x = torch.randint(0, 128, (32,))
    cu = torch.tensor([0, 20, 32, 32], dtype=torch.int32)
    loss = m(x, x, cu, x % 96, ForwardArgs(torch.tensor([1.0, 0.5]), 8, 16))
    loss.backward()
    assert torch.isfinite(loss) and m.attn_bank.grad.shape == (5, 192, 48)


def test_mask_is_causal_within_documents_and_window():
    cu = torch.tensor([0, 3, 7, 7, 7], dtype=torch.int32)
    doc = document_ids(cu, 7)
    assert doc.tolist() == [1, 1, 1, 2, 2, 2, 2]
    mask = attention_mask(doc, 7, 2, "cpu")
    allowed = {(i, j) for i in range(7) for j in range(7) if mask[i, j]}
    expect = {(i, j) for i in range(7) for j in range(7)
              if j <= i and i - j <= 2 and (i < 3) == (j < 3)}
    assert allowed == expect


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_matches_sdpa_on_cpu():
    torch.manual_seed(0)
    T, H, D = 384, 2, 16  # three 128-blocks: some are skipped whole by the block mask
    q, k, v = (torch.randn(T, H, D) for _ in range(3))
    doc = document_ids(torch.tensor([0, 40, 300, 384], dtype=torch.int32), T)
    for window in (None, 20, 150):
        want = _sdpa(q, k, v, attention_mask(doc, T, window, "cpu"), 0.3)
        got = _flex(q, k, v, block_mask(doc, T, window, "cpu"), 0.3)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_yarn_apply_scales_only_slow_frequencies():
    y = YarnRope(16, 64)
    f0 = y.angular_freq.clone()
    y.apply(128, 384)
    assert y.attn_scale == pytest.approx(0.1 * (0.2 * math.log(3) + 1))
    rot = 128 * f0 / (2 * math.pi)
    slow, fast = (rot <= 1) & (f0 > 0), rot >= 32
    torch.testing.assert_close(y.angular_freq[slow], f0[slow] / 3)
    torch.testing.assert_close(y.angular_freq[fast], f0[fast])
    assert not y.angular_freq[8:].any()  # the truncated half stays unrotated
    assert y.factor1.dtype == torch.bfloat16


def test_mtp_loss_by_hand():
    z = torch.randn(5, 7)
    t = torch.randint(0, 7, (5,))
    w = torch.tensor([1.0, 0.5])
    got = mtp_loss(z, t, w)
    capped = 23 * torch.sigmoid((z + 5) / 7.5)
    ce = lambda i, j: F.cross_entropy(capped[i:i + 1], t[j:j + 1])  # noqa: E731
    want = torch.stack([ce(i, i) + (0.5 * ce(i, i + 1) if i + 1 < 5 else 0) for i in range(5)])
    torch.testing.assert_close(got, want)


def test_fp8_head_falls_back_to_a_plain_matmul_off_cuda():
    torch.manual_seed(0)
    plain = SpeedrunGPT(**TINY)
    fp8 = SpeedrunGPT(**TINY, features=SpeedrunFeatures(fp8_head=True))
    fp8.load_state_dict(plain.state_dict())
    x, y = torch.randint(0, 128, (2, 32))
    cu = torch.tensor([0, 12, 32, 32], dtype=torch.int32)
    args = ForwardArgs(torch.tensor([1.0, 0.5]), 8, 16)
    assert torch.equal(plain(x, y, cu, x % 96, args), fp8(x, y, cu, x % 96, args))
