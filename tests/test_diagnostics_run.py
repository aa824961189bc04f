"""Diagnostics in a real 2-rank run (torchrun, gloo): the diag lines cover the sampled matrices
at every diag_every-th step, the spectra file is written, and the losses are bit-identical to
the same run without diagnostics. Both runs go through harness.trainer.main one after the
other in the same two torchrun processes and process group (one launch: most of a tiny run
is start-up)."""

import numpy as np
import pytest

from train_utils import ROOT, SMALL, VENV_BIN, log_of, losses

pytestmark = pytest.mark.multiprocess

MATRICES = {f"blocks.{i}.{m}" for i in range(2) for m in
            ("attn.qkv.q", "attn.qkv.k", "attn.qkv.v", "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight")}

TWIN_RUNS = """
import sys
from harness import dist as hdist
from harness.trainer import main
common = {common!r}
diag = ["--diag_every", "2", "--diag_sample", "7", "--diag_spectra", "1", "--diag_embed_head", "1"]
# one process group for both runs: gloo cannot be re-initialised reliably under one rendezvous
shutdown, hdist.shutdown = hdist.shutdown, lambda info: None
first = main("train_gpt.py", common + ["--run_id", "on"] + diag)
hdist.shutdown = shutdown
sys.exit(max(first, main("train_gpt.py", common + ["--run_id", "off"])))
"""


def test_two_rank_diagnostics_lines_and_identical_losses(tmp_path, shards_dir):
    import os
    import subprocess

    common = SMALL + ["--log_dir", str(tmp_path / "logs"), "--train_files", str(shards_dir / "local_train_*.bin"),
                      "--val_files", str(shards_dir / "local_val_*.bin")]
    script = tmp_path / "twin_runs.py"
    script.write_text(TWIN_RUNS.format(common=common))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(script)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log_on, log_off = log_of(tmp_path, "on"), log_of(tmp_path, "off")
    assert log_on.config["world_size"] == 2 and log_on.status == log_off.status == "finished"
    assert losses(log_on) == losses(log_off)  # exactly: the instrument only reads
    assert not log_off.diags

    steps = sorted({d.step for d in log_on.diags})
    assert steps == [0, 2, 4]
    for step in steps:
        layers = [d.layer for d in log_on.diags if d.step == step]
        muon = [x for x in layers if x in MATRICES]
        assert len(muon) == len(set(muon)) == 7  # the sample, each once, gathered from both ranks
        assert {"embed.weight", "lm_head.weight"} <= set(layers)
    sampled = {d.layer for d in log_on.diags if d.layer in MATRICES}
    assert len(sampled) == 7
    late = [d.values for d in log_on.diags if d.step == 4 and d.layer in MATRICES]
    for v in late:
        assert 1.0 <= v["eff_rank"] <= 64 and 1.0 <= v["eff_rank_ns"] <= 64
        assert v["eff_rank_ns"] > v["eff_rank_mom"]
        assert 0.0 < v["ns_angle_deg"] < 90.0 and 0.0 <= v["align_wdw"] <= 1.0
        assert 0.0 <= v["w_entropy"] <= 1.0 and v["w_smax"] > 0
    z = np.load(tmp_path / "logs" / "on.spectra.npz")
    assert z["steps"].tolist() == [0, 2, 4]
    for layer in sampled:
        assert z[f"{layer}:ns"].shape == (3, 64)
