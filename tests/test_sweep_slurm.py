"""The Slurm executor: the job scripts, and two tiny runs of the real trainer submitted to a
real one-node Slurm cluster (tests/slurm_cluster.py; skipped, with the reason, where the
daemons cannot start)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from slurm_cluster import slurm_cluster  # noqa: F401  (the session fixture)

from harness.logs.format import log_path, read_log
from harness.sweep.manifest import RunRecord
from harness.sweep.slurm import SlurmOptions, sbatch_script
from sweep_utils import LAUNCHER, tiny_sets

pytestmark = pytest.mark.usefixtures("local_corpus")  # runs with the default data/local (tests/conftest.py)



def _rec(nproc: int, preset: str = "speedrun") -> RunRecord:
    return RunRecord(key="k", tag="t", seed=0, script="train_gpt.py", nproc=nproc, baseline=False, swept={},
                     fields={"preset": preset},
                     run_id="lrmul-1-cd0.55-t-20260101-000000", command=["python", "train_gpt.py", "--run_id", "x y"])


def test_sbatch_script_one_cpu_node_and_multi_node_gpus(tmp_path):
    # a repository path that only survives the shell quoted
    one = text = sbatch_script(_rec(1), ["--run_id", "x y"],
                               SlurmOptions(partition="cpu", time="00:30:00", gpus_per_node=0),
                               tmp_path / "it's here", tmp_path / "o.%j.out", python="/venv/bin/python")
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert "#SBATCH --partition=cpu" in lines and "#SBATCH --time=00:30:00" in lines and "#SBATCH --nodes=1" in lines
    assert "#SBATCH --signal=B:TERM@120" in lines and f"#SBATCH --output={tmp_path}/o.%j.out" in lines
    assert not any("gpus" in l for l in lines)  # CPU nodes: no GPU request
    assert f"cd '{tmp_path}/it'\"'\"'s here'" in lines and lines[-1] == "exec /venv/bin/python train_gpt.py --run_id 'x y'"
    # no --signal without a time limit to signal before; none when asked for 0 s
    assert "--signal" not in sbatch_script(_rec(1), [], SlurmOptions(time="00:30:00", signal_s=0), Path("/r"),
                                           tmp_path / "o.out", python="/venv/bin/python")

    text = sbatch_script(_rec(8), ["--tag", "t"], SlurmOptions(nodes=2, extra=["--qos=high"]), Path("/repo"),
                         tmp_path / "o.out", python="/venv/bin/python")
    assert "#SBATCH --gpus-per-node=8" in text and "#SBATCH --nodes=2" in text and "#SBATCH --qos=high" in text
    assert "--time" not in text and "--partition" not in text
    # a CPU preset asks for no GPU unless told to
    assert "gpus" not in sbatch_script(_rec(2, "tiny"), [], SlurmOptions(), Path("/r"), tmp_path / "o.out")
    assert "#SBATCH --gpus-per-node=1" in sbatch_script(_rec(2, "tiny"), [], SlurmOptions(gpus_per_node=1), Path("/r"),
                                                        tmp_path / "o.out")
    assert 'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in text
    last = text.splitlines()[-1]
    assert last.startswith("exec srun --nodes=$SLURM_NNODES --ntasks-per-node=1 --kill-on-bad-exit=1 ")
    assert ('--nnodes=$SLURM_NNODES --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint="$head:$port" '
            '--rdzv-id="$SLURM_JOB_ID" train_gpt.py --tag t') in last
    # a bash syntax check of both scripts
    for script in (one, text):
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    # and the first one's cd, run by bash, lands in that directory
    (tmp_path / "it's here").mkdir()
    cd_line = next(l for l in one.splitlines() if l.startswith("cd "))
    r = subprocess.run(["bash", "-c", f"{cd_line} && pwd"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"{tmp_path}/it's here", r.stderr


@pytest.mark.parametrize("no_wait", [False, True], ids=["wait", "no-wait-then-resume"])
def test_two_tiny_runs_on_a_real_slurm_cluster(slurm_cluster, tmp_path, no_wait):  # noqa: F811
    logs = tmp_path / "logs"
    sets = tiny_sets(3) + (["--no-wait"] if no_wait else [])
    r = subprocess.run([*LAUNCHER, "--slurm", "--partition", slurm_cluster.partition, "--time", "00:10:00",
                        "--gpus-per-node", "0", "--poll", "0.5", "--grid", "spectral_lr_mul=0,1",
                        "--script", "train_gpt_muon_new.py", "--tag", "ord", "--log-dir", str(logs), *sets],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, env=slurm_cluster.env)
    assert r.returncode == 0, r.stdout + r.stderr + slurm_cluster.log_tail()
    (path,) = (logs / "sweeps").glob("*.json")
    doc = json.loads(path.read_text())
    if no_wait:
        # submitted and returned; --resume waits for the queued jobs (never resubmits them) and summarizes
        assert "submitted; follow with: python monitor_runs.py --sweep" in r.stdout
        submitted = {x["run_id"]: x["job_id"] for x in doc["runs"]}
        assert all(x["status"] in ("submitted", "running") for x in doc["runs"])
        r = subprocess.run([*LAUNCHER, "--resume", doc["sweep_id"], "--poll", "0.5", "--log-dir", str(logs)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300, env=slurm_cluster.env)
        assert r.returncode == 0, r.stdout + r.stderr + slurm_cluster.log_tail()
        doc = json.loads(path.read_text())
        assert {x["run_id"]: x["job_id"] for x in doc["runs"]} == submitted
    assert doc["executor"]["kind"] == "slurm" and doc["executor"]["slurm"]["partition"] == slurm_cluster.partition
    assert [x["tag"] for x in doc["runs"]] == ["ord_0", "ord_1"]
    job_ids = set()
    for x in doc["runs"]:
        assert (x["status"], x["exit_code"]) == ("finished", 0), x
        job_ids.add(x["job_id"])
        log = read_log(log_path(logs, x["run_id"]))
        assert log.finished and x["final_val_loss"] == log.final_val_loss
        assert log.config["tag"] == x["tag"] and log.config["spectral_lr_mul"] == x["swept"]["spectral_lr_mul"]
        assert log.config["ord"] is True and log.config["script"] == "train_gpt_muon_new.py"
        # the job's console output and its script sit next to the manifest
        out = Path(x["output"])
        assert out.name == f"{x['run_id']}.{x['job_id']}.out" and "status:finished" in out.read_text()
        script = (logs / "sweeps" / doc["sweep_id"] / f"{x['run_id']}.sbatch").read_text()
        assert f"#SBATCH --partition={slurm_cluster.partition}" in script and "--gpus" not in script
    assert len(job_ids) == 2 and all(j.isdigit() for j in job_ids)
    if no_wait:  # (jobs that ended before the resume started are simply read back)
        assert "waiting for " in r.stdout or "0 run(s) to do of 2" in r.stdout
    else:
        assert "submitted " in r.stdout
    assert "finished" in r.stdout.split("#  tag")[1]
