"""Each experiment end to end at a very small size: its table and non-blank figures, and the
numbers it returns make sense."""

import gzip
import math
import subprocess
import sys

import numpy as np
import pytest

from experiments import digits_comparison, gradient_rank, gradient_snr, ns_analysis, rank_manipulation
from experiments import weight_update_dynamics
from train_utils import ROOT


pytestmark = pytest.mark.usefixtures("one_thread", "local_corpus")  # tests/conftest.py; the default data/local


@pytest.fixture
def tiny(shards_dir):
    return dict(num_layers=1, model_dim=32, num_heads=2, seq_len=16, batch=2, steps=5, val_batches=1,
                vocab="compact", data=str(shards_dir))


def check_outputs(out, figures, table_needles):
    import matplotlib.image as mpimg

    table = (out / "table.md").read_text()
    assert table.startswith("# ") and "|---" in table
    for needle in table_needles:
        assert needle in table
    for name in figures:
        img = mpimg.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert float(np.var(img[..., :3])) > 1e-3, f"{name} is blank"
    assert not list(out.glob(".*tmp*"))
    return table


def test_gradient_rank(tmp_path, tiny):
    res = gradient_rank.run(tmp_path, measure=3, **tiny)
    table = check_outputs(tmp_path, ["eff_rank.png", "loss.png"],
                          ["Adam start→end", "Muon after NS", "blocks.0.attn.qkv.q", "blocks.0.mlp.proj.weight"])
    assert "Final validation loss: Adam" in table
    assert len(res["layers"]) == 6 and res["adam"]["steps"] == [0, 2, 4]
    for layer in res["layers"]:
        raw = res["muon"]["eff_rank"][layer][-1]
        assert 1 <= raw <= 32 and res["muon"]["eff_rank_ns"][layer][-1] > raw  # NS raises the rank
    assert math.isfinite(res["adam"]["final_val_loss"]) and len(res["muon"]["loss"]) == 5


def test_rank_manipulation(tmp_path, tiny):
    res = rank_manipulation.run(tmp_path, k=2, **tiny)
    check_outputs(tmp_path, ["loss_curves.png", "final_loss.png"], ["| full |", "| low_rank |", "| orthonormal |",
                                                                    "| equalized |", "k = 2"])
    modes = res["modes"]
    assert modes["low_rank"]["mean_update_eff_rank"] <= 2.0 + 1e-4
    assert modes["orthonormal"]["mean_update_eff_rank"] > modes["full"]["mean_update_eff_rank"]
    # computed here: the head starts at zero, so the first loss is ln(V) for the compact
    # vocabulary of these shards (the ids they use, rounded up to a multiple of 128)
    from data.shards import compact_vocab, find_shards

    _, used = compact_vocab(find_shards(str(tiny["data"] + "/local_*.bin")))
    vocab = -(-used // 128) * 128
    for mode in modes:
        assert modes[mode]["loss"][0] == pytest.approx(math.log(vocab), abs=1e-5), mode
    # and the first step moves only the head (the hidden gradients are zero while it is zero, and
    # every transform keeps a zero gradient zero): the same second loss in every mode
    assert len({modes[m]["loss"][1] for m in modes}) == 1, {m: modes[m]["loss"][1] for m in modes}


def test_ns_analysis(tmp_path, tiny):
    res = ns_analysis.run(tmp_path, stages=2, **tiny)
    check_outputs(tmp_path, ["ns_metrics.png", "spectra.png"], ["attn.q", "mlp.fc", "σ band PE"])
    assert res["types"][:4] == ["attn.k", "attn.proj", "attn.q", "attn.v"]
    for key, v in res["table"].items():
        assert v["eff_rank_ns"] > v["eff_rank"], key
        assert 0 < v["angle_deg"] < 90 and 0 < v["rel_loss_scaled"] < 2
        assert v["ns_smax"] < 1.3


def test_gradient_snr(tmp_path, tiny):
    res = gradient_snr.run(tmp_path, minibatches=3, points=2, **tiny)
    check_outputs(tmp_path, ["snr.png"], ["raw @", "orth @", "| mean |"])
    assert res["points"] == [2, 5]
    for step in res["points"]:
        for layer, v in res["snr"][step].items():
            assert v["raw"] > 0 and v["orth"] > 0, (step, layer)


def test_weight_update_dynamics(tmp_path, tiny):
    res = weight_update_dynamics.run(tmp_path, topk=4, every=2, **tiny)
    check_outputs(tmp_path, ["update_alignment.png", "entropy_heatmap.png", "stretching.png"],
                  ["alignment W/ΔW start→end", "blocks.0.attn.qkv.v"])
    assert res["steps"] == [0, 2, 4] and len(res["layers"]) == 6
    for layer in res["layers"]:
        finite = [a for a in res["series"]["align_wdw"][layer] if math.isfinite(a)]
        assert finite and all(0 <= a <= 1 for a in finite)
        ent = [e for e in res["series"]["w_entropy"][layer] if math.isfinite(e)]
        assert ent and all(0 <= e <= 1 for e in ent)
    # zero-initialised output projections: no spectrum at step 0, a growing one after
    assert res["series"]["w_smax"]["blocks.0.mlp.proj.weight"][0] == 0
    assert res["series"]["w_smax"]["blocks.0.mlp.proj.weight"][-1] > 0


def test_digits_with_sklearn(tmp_path):
    res = digits_comparison.run(tmp_path, epochs=2, hidden=32, limit=800)
    check_outputs(tmp_path, ["accuracy.png", "eff_rank.png"], ["| AdamW |", "| Muon NS3 |", "| Muon NS5 |",
                                                              "800 training images"])
    for arm, r in res["arms"].items():
        assert len(r["accuracy"]) == 2 and r["train_loss"][1] < r["train_loss"][0], arm
        assert all(b < a for b, a in zip(r["eff_rank"], r["eff_rank_ns"])), arm
    assert max(r["accuracy"][-1] for r in res["arms"].values()) > 0.3  # chance is 0.1


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_digits_with_mnist_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    labels = {"train": rng.integers(0, 10, 200), "t10k": rng.integers(0, 10, 50)}
    for split, y in labels.items():
        # class-dependent bright pixel: learnable
        x = rng.integers(0, 40, (len(y), 28, 28))
        x[np.arange(len(y)), 2 * y, 2 * y] = 255
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", y)
    x, y, xt, yt = digits_comparison.load_data(str(tmp_path), seed=0)
    assert x.shape == (200, 784) and xt.shape == (50, 784) and float(x.max()) == 1.0
    assert y.tolist() == labels["train"].tolist()
    out = tmp_path / "out"
    digits_comparison.run(out, epochs=1, hidden=8, mnist=str(tmp_path))
    assert "MNIST IDX files" in (out / "table.md").read_text()


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "bad-images-idx3-ubyte").write_bytes(b"\x01\x02")
    with pytest.raises(Exception, match="not an unsigned-byte IDX file"):
        digits_comparison.read_idx(tmp_path / "bad-images-idx3-ubyte")
    proc = subprocess.run([sys.executable, "-m", "experiments.digits_comparison", "--out", str(tmp_path / "o"),
                           "--mnist", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line == (f"error: --mnist {tmp_path}: train-images-idx3-ubyte(.gz) not found (needs train-images-idx3-ubyte, "
                    "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte)")
