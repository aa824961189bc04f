import math
import warnings

import pytest
import torch

from harness.config import load_config
from harness.model import GPT, ModelShape

FLAGS = ["--num_layers", "4", "--model_dim", "32", "--num_heads", "2", "--seq_len", "32", "--vocab_size", "256",
         "--batch_sizes", "64,64,64,64", "--device_batch_tokens", "64"]


def make(*flags, seed=0, noise=True):
    cfg = load_config(FLAGS + list(flags), env={})
    torch.manual_seed(seed)
    model = GPT(ModelShape.from_config(cfg))
    if noise:  # leave the zero-initialised projections and head behind
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return model


def test_initial_loss_is_uniform_over_the_vocabulary():
    model = make(noise=False)
    idx = torch.randint(0, 256, (2, 32))
    assert model(idx, idx).item() == pytest.approx(math.log(256), abs=1e-6)


@pytest.mark.parametrize("window", ["0", "8"])
def test_flex_attention_matches_sdpa(window):
    model = make("--window_size", window)
    idx = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        ref = model.logits(idx)
        model.set_attention("flex")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flex without compile warns that it is unfused
            flex = model.logits(idx)
    torch.testing.assert_close(flex, ref, rtol=1e-4, atol=1e-4)


def test_causality_and_window():
    model = make("--window_size", "4")
    idx = torch.randint(0, 256, (1, 32))
    with torch.no_grad():
        base = model.logits(idx)
        changed = idx.clone()
        changed[0, 20] = (changed[0, 20] + 1) % 256
        out = model.logits(changed)
    diff = (out - base).abs().amax(dim=-1)[0]
    assert diff[:20].max() == 0  # the future never leaks into the past
    assert diff[20] > 0


@pytest.mark.parametrize("flag", ["--rope", "--qk_norm", "--value_embeds", "--unet_skips"])
def test_features_are_switchable(flag):
    idx = torch.randint(0, 256, (2, 32))
    on, off = make(flag, "1"), make(flag, "0")
    with torch.no_grad():
        assert not torch.allclose(on.logits(idx), off.logits(idx))


def test_value_embeds_and_softcap():
    m = make("--value_embeds", "1")
    assert m.n_value_embeds == 2 and len(m.value_embeds) == 2
    assert make("--value_embeds", "0").n_value_embeds == 0
    capped = make("--logit_softcap", "2")
    with torch.no_grad():
        assert capped.logits(torch.randint(0, 256, (1, 32))).abs().max() <= 2.0
