"""Sweep declaration: TOML files and flags -> runs, run ids, commands; bad input stops
everything with one line before anything starts. No training here (fast)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from base import UserError
from harness.config import script_overrides, RUN_ID_PATTERN, load_config
from harness.sweep.launch import create_sweep
from harness.sweep.spec import SweepSpec, apply_flags, expand, load_sweep_file, run_id_for, value_text

pytestmark = pytest.mark.usefixtures("local_corpus")  # the launcher checks the default data/local shards

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = [sys.executable, str(ROOT / "launch_lr_sweep.py")]


def _launch(*args, cwd=ROOT):
    return subprocess.run([*LAUNCHER, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_spectral_lr_toml_is_the_seed_experiment(tmp_path):
    spec = load_sweep_file(ROOT / "sweeps/spectral_lr.toml")
    m = create_sweep(spec, repo_root=ROOT, log_dir=str(tmp_path), max_runs=200)
    by_tag = {r.tag: r for r in m.runs}
    # the fork's grid (the fork's SPECTRAL_SWEEP_FINAL.md; docs/REFERENCE.md, "The ORD experiment") and its tags
    assert list(by_tag) == ["baseline_std", "spectral_lr_0", "spectral_lr_0.01", "spectral_lr_0.1", "spectral_lr_0.5",
                            "spectral_lr_1"]
    assert by_tag["baseline_std"].script == "train_gpt.py" and by_tag["baseline_std"].baseline
    assert all(r.script == "train_gpt_muon_new.py" for r in m.runs[1:])
    for r in m.runs:
        assert r.nproc == 8 and RUN_ID_PATTERN.match(r.run_id) and len(r.run_id) <= 200
        assert r.run_id.startswith(f"lrmul-1-1.52-1.73-1-cd0.55-{r.tag}-")
        # the command, parsed by the trainer's own config loader, is the experiment
        args = r.command[r.command.index(r.script) + 1:]
        assert r.command[:3] == [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=8"]
        cfg = load_config(args, env={}, overrides=script_overrides(r.script))
        assert cfg.preset == "speedrun" and cfg.lr_muls == [1.0, 1.52, 1.73, 1.0] and cfg.cooldown_frac == 0.55
        assert cfg.batch_sizes == [131072, 262144, 393216, 393216]
        assert (cfg.num_scheduled_iterations, cfg.num_extension_iterations, cfg.val_loss_every) == (1560, 40, 50)
        assert cfg.tag == r.tag and cfg.run_id == r.run_id and cfg.seed == 0 and cfg.log_dir == str(tmp_path)
    ord_on = {"ord": True}
    assert load_config(by_tag["spectral_lr_0"].command[4:], env={}, overrides=ord_on).spectral_lr_mul == 0.0
    assert load_config(by_tag["spectral_lr_0.1"].command[4:], env={}, overrides=ord_on).spectral_lr_mul == 0.1
    assert load_config(by_tag["baseline_std"].command[4:], env={}).spectral_lr_mul is None
    assert len({r.run_id for r in m.runs}) == len(m.runs)


def test_tiny_ord_toml_expands_with_seeds(tmp_path):
    spec = apply_flags(load_sweep_file(ROOT / "sweeps/tiny_ord.toml"), seeds="0,1")
    m = create_sweep(spec, repo_root=ROOT, log_dir=str(tmp_path), max_runs=200)
    assert [(r.tag, r.seed) for r in m.runs] == [
        ("baseline_std", 0), ("baseline_std", 1), ("spectral_lr_0", 0), ("spectral_lr_0", 1),
        ("spectral_lr_0.1", 0), ("spectral_lr_0.1", 1), ("spectral_lr_1", 0), ("spectral_lr_1", 1)]
    # one process on CPU: plain python; several seeds: the seed is in the run id
    assert all(r.command[0] == sys.executable for r in m.runs)
    assert m.runs[1].run_id.startswith("lrmul-1-1.52-1.73-1-cd0.55-baseline_std-s1-")


def test_flags_grid_product_baseline_and_list_fields(tmp_path):
    spec = apply_flags(SweepSpec(), grids=["spectral_lr_mul=0,0.5", "batch_sizes=64:64:64:64,128:128:128:128"],
                       seeds="3", script="train_gpt_muon_new.py", tag="ord", baselines=["train_gpt.py"],
                       sets=["seq_len=32", "device_batch_tokens=64", "val_tokens=64", "compile=off"])
    plans = expand(spec, ROOT)
    assert [p.tag for p in plans] == ["baseline", "ord_spectral_lr_mul=0_batch_sizes=64-64-64-64",
                                      "ord_spectral_lr_mul=0_batch_sizes=128-128-128-128",
                                      "ord_spectral_lr_mul=0.5_batch_sizes=64-64-64-64",
                                      "ord_spectral_lr_mul=0.5_batch_sizes=128-128-128-128"]
    assert plans[0].baseline and plans[0].script == "train_gpt.py" and "spectral_lr_mul" not in plans[0].fields
    assert plans[4].fields["batch_sizes"] == [128, 128, 128, 128] and plans[4].fields["spectral_lr_mul"] == 0.5
    assert all(p.seed == 3 for p in plans)
    flags = plans[4].flags("rid", "L")
    assert flags[flags.index("--batch_sizes") + 1] == "128,128,128,128" and flags[flags.index("--compile") + 1] == "off"
    assert value_text(True) == "1" and value_text(1.0) == "1" and value_text(0.05) == "0.05" and value_text(1e30) == "1e+30"
    assert run_id_for(plans[1], "T", with_seed=False) == "ord_spectral_lr_mul=0_batch_sizes=64-64-64-64-T"


@pytest.mark.parametrize("args, needle", [
    (["--grid", "no_such_field=1,2"], "--grid no_such_field: unknown config field 'no_such_field'"),
    (["--grid", "muon_lr=0.02,-1"], "muon_lr=-1.0 is invalid: must be finite and >= 0"),
    (["--grid", "num_heads=2,3", "--set", "model_dim=32"], "num_heads=3 is invalid: must divide model_dim=32"),
    (["--grid", "muon_lr=0.01,0.02,0.03", "--seeds", "0,1", "--max_runs", "5"], "expands to 6 runs, more than --max_runs 5"),
    (["--grid", "muon_lr=0.1", "--tag", "../evil"], "tag '../evil_0.1' is invalid"),
    (["--grid", "muon_lr=0.1", "--tag", "a/b"], "tag 'a/b_0.1' is invalid"),
    (["--grid", "seq_len=abc"], "seq_len='abc' is not an integer"),
    (["--grid", "seed=1,2"], "'seed' cannot be a grid axis (use seeds)"),
    (["--grid", "muon_lr=0.1", "--script", "nope.py"], "script='nope.py' is not a training script"),
    (["--set", "batch_sizes=100,100,100,100", "--grid", "muon_lr=0.1"], "must be a multiple of seq_len"),
    (["--resume", "no-such-sweep"], "no manifest for sweep 'no-such-sweep'"),
    (["--grid", "muon_lr=0.1", "--nproc", "4", "--gpus", "0,1"], "run muon_lr_0.1 needs 4 GPUs; this node has 2"),
])
def test_bad_input_one_line_exit_2_nothing_started(tmp_path, args, needle):
    r = _launch(*args, "--log_dir", str(tmp_path / "logs"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert not (tmp_path / "logs").exists()  # no manifest, no log, nothing started


def test_bad_value_in_toml_names_the_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('[defaults]\nseq_len = 32\n[[grids]]\ntag = "x"\n[grids.axes]\ncooldown_frac = [0.5, 1.5]\n')
    r = _launch(str(f), "--log_dir", str(tmp_path / "logs"))
    assert r.returncode == 2 and "cooldown_frac=1.5 is invalid: must be in [0, 1]" in r.stderr
    assert "run x_1.5 seed 0" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    f.write_text('[[grids]]\n[grids.axes]\nbogus = [1]\n')
    r = _launch(str(f), "--log_dir", str(tmp_path / "logs"))
    assert r.returncode == 2 and f"{f} [[grids]] #1.axes: unknown config field 'bogus'" in r.stderr
    f.write_text('[defaults]\nrun_id = "x"\n[[runs]]\n')
    with pytest.raises(UserError, match="'run_id' cannot be set in a sweep"):
        load_sweep_file(f)
    assert not (tmp_path / "logs").exists()


def test_dry_run_prints_every_command_and_writes_nothing(tmp_path):
    r = _launch("sweeps/tiny_ord.toml", "--seeds", "0,1", "--dry_run", "--log_dir", str(tmp_path / "logs"))
    assert r.returncode == 0, r.stderr
    cmds = [l for l in r.stdout.splitlines() if not l.startswith("#")]
    assert len(cmds) == 8 and all(" train_gpt" in c and "--run_id lrmul-1-1.52-1.73-1-cd0.55-" in c for c in cmds)
    assert sum("--tag spectral_lr_0.1 --seed 1" in c for c in cmds) == 1
    assert not (tmp_path / "logs").exists()
    # Slurm: the sbatch scripts instead
    r = _launch("sweeps/spectral_lr.toml", "--dry_run", "--slurm", "--partition", "gpu", "--time", "01:00:00",
                "--nodes", "2", "--log_dir", str(tmp_path / "logs"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("#SBATCH --partition=gpu") == 6 and r.stdout.count("#SBATCH --gpus-per-node=8") == 6
    assert "--nnodes=$SLURM_NNODES" in r.stdout and '--rdzv-endpoint="$head:$port"' in r.stdout
    assert not (tmp_path / "logs").exists()
