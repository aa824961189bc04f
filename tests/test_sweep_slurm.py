"""The Slurm executor: the job scripts, and two tiny runs of the real trainer submitted to a
real one-node Slurm cluster (tests/slurm_cluster.py; skipped, with the reason, where the
daemons cannot start)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from slurm_cluster import slurm_cluster  # noqa: F401  (the session fixture)

from harness.logs.format import log_path, read_log
from harness.sweep.manifest import RunRecord
from harness.sweep.slurm import SlurmOptions, array_script, sbatch_script
from sweep_utils import LAUNCHER, ROOT, tiny_sets

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
    sets = tiny_sets(3) + (["--no_wait"] if no_wait else [])
    r = subprocess.run([*LAUNCHER, "--slurm", "--partition", slurm_cluster.partition, "--time", "00:10:00",
                        "--gpus_per_node", "0", "--poll", "0.5", "--grid", "spectral_lr_mul=0,1",
                        "--script", "train_gpt_muon_new.py", "--tag", "ord", "--log_dir", str(logs), *sets],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, env=slurm_cluster.env)
    assert r.returncode == 0, r.stdout + r.stderr + slurm_cluster.log_tail()
    (path,) = (logs / "sweeps").glob("*.json")
    doc = json.loads(path.read_text())
    if no_wait:
        # submitted and returned; --resume waits for the queued jobs (never resubmits them) and summarizes
        assert "submitted; follow with: python monitor_runs.py --sweep" in r.stdout
        submitted = {x["run_id"]: x["job_id"] for x in doc["runs"]}
        assert all(x["status"] in ("submitted", "running") for x in doc["runs"])
        r = subprocess.run([*LAUNCHER, "--resume", doc["sweep_id"], "--poll", "0.5", "--log_dir", str(logs)],
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


def _opts(**kw) -> SlurmOptions:
    return SlurmOptions(partition="cpu", time="00:30:00", gpus_per_node=0, **kw)


def test_array_and_requeue_scripts(tmp_path):
    run_dir = tmp_path / "sweeps" / "s-1"
    text = array_script("s-1", ["run_a", "run b"], run_dir, _opts(array=True, array_parallel=1, requeue=True), 0)
    lines = text.splitlines()
    assert "#SBATCH --array=0-1%1" in lines and "#SBATCH --requeue" in lines and "#SBATCH --signal=B:TERM@120" in lines
    assert f"#SBATCH --output={run_dir}/array.%A_%a.out" in lines
    assert "runs=(run_a 'run b')" in lines and "run_id=${runs[$SLURM_ARRAY_TASK_ID]}" in lines
    assert lines[-1] == f'exec bash {run_dir}/"$run_id.sh"'
    assert "#SBATCH --array=0-2" in array_script("s-1", ["a", "b", "c"], run_dir, _opts(array=True), 0).splitlines()
    assert "--requeue" not in array_script("s-1", ["a"], run_dir, _opts(array=True), 0)

    # --requeue: the run is a child of the job's shell, which forwards SIGTERM, requeues a
    # pre-empted job and resumes a requeued one from the run's checkpoint
    opts = _opts(requeue=True)
    one = sbatch_script(_rec(1), ["--run_id", "r"], opts, Path("/repo"), tmp_path / "o.out", python="/venv/bin/python",
                        log_file="/logs/r.txt", checkpoint_dir="/ck/r")
    assert "#SBATCH --requeue" in one and "#SBATCH --signal=B:TERM@120" in one
    assert "exec " not in one and "trap '[ -z \"$child\" ] || kill -TERM \"$child\" 2>/dev/null' TERM" in one
    assert '/venv/bin/python train_gpt.py --run_id r ${resume[@]+"${resume[@]}"} &' in one
    assert "resume=(--resume latest)" in one and "ls /ck/r 2>/dev/null" in one and "SLURM_RESTART_COUNT" in one
    assert 'scontrol requeue "$SLURM_JOB_ID"' in one and "grep '^status:' /logs/r.txt" in one
    # a command that resumes already keeps its own --resume
    again = sbatch_script(_rec(1), ["--resume", "latest"], opts, Path("/repo"), tmp_path / "o.out",
                          log_file="/logs/r.txt", checkpoint_dir="/ck/r")
    assert "resume=(" not in again and "--resume latest &" in again
    with pytest.raises(ValueError):
        sbatch_script(_rec(1), [], opts, Path("/repo"), tmp_path / "o.out")
    # several nodes: srun (one torchrun per node at the c10d rendezvous) runs as the child
    multi = sbatch_script(_rec(8), ["--tag", "t"], SlurmOptions(nodes=2, requeue=True), Path("/repo"), tmp_path / "o.out",
                          log_file="/logs/r.txt", checkpoint_dir="/ck/r")
    srun = next(l for l in multi.splitlines() if "srun" in l)
    assert srun.startswith("srun --nodes=$SLURM_NNODES") and srun.endswith('train_gpt.py --tag t ${resume[@]+"${resume[@]}"} &')
    assert '--rdzv-backend=c10d --rdzv-endpoint="$head:$port" --rdzv-id="$SLURM_JOB_ID"' in srun
    for script in (text, one, again, multi):
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def _sweep(slurm_cluster, tmp_path, *extra: str, steps: int = 3) -> list[str]:  # noqa: F811
    sets = tiny_sets(steps)
    return [*LAUNCHER, "--slurm", "--partition", slurm_cluster.partition, "--time", "00:10:00", "--gpus_per_node", "0",
            "--poll", "0.5", "--log_dir", str(tmp_path / "logs"), *sets, *extra]


def test_a_job_array_of_two_tiny_runs(slurm_cluster, tmp_path):  # noqa: F811
    logs = tmp_path / "logs"
    r = subprocess.run(_sweep(slurm_cluster, tmp_path, "--array", "--array_parallel", "1", "--no_wait",
                              "--grid", "spectral_lr_mul=0,1", "--script", "train_gpt_muon_new.py", "--tag", "ord"),
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, env=slurm_cluster.env)
    assert r.returncode == 0, r.stdout + r.stderr + slurm_cluster.log_tail()
    assert "submitted 2 run(s) as job array " in r.stdout
    (path,) = (logs / "sweeps").glob("*.json")
    doc = json.loads(path.read_text())
    assert doc["executor"]["slurm"]["array"] is True and doc["executor"]["slurm"]["array_parallel"] == 1
    array_id = doc["runs"][0]["job_id"].split("_")[0]
    assert [x["job_id"] for x in doc["runs"]] == [f"{array_id}_0", f"{array_id}_1"] and array_id.isdigit()
    # --resume finds the array's tasks in the queue (squeue -r), waits for them and summarizes
    r = subprocess.run([*LAUNCHER, "--resume", doc["sweep_id"], "--poll", "0.5", "--log_dir", str(logs)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, env=slurm_cluster.env)
    assert r.returncode == 0, r.stdout + r.stderr + slurm_cluster.log_tail()
    doc = json.loads(path.read_text())
    run_dir = logs / "sweeps" / doc["sweep_id"]
    assert sorted(p.name for p in run_dir.glob("*.sbatch")) == ["array-1.sbatch"]  # one job, not one per run
    assert "#SBATCH --array=0-1%1" in (run_dir / "array-1.sbatch").read_text()
    for task, x in enumerate(doc["runs"]):
        assert (x["status"], x["exit_code"], x["job_id"]) == ("finished", 0, f"{array_id}_{task}"), x
        log = read_log(log_path(logs, x["run_id"]))
        assert log.finished and x["final_val_loss"] == log.final_val_loss
        assert log.config["spectral_lr_mul"] == x["swept"]["spectral_lr_mul"]
        out = Path(x["output"])
        assert out.name == f"{x['run_id']}.{array_id}_{task}.out" and "status:finished" in out.read_text()
        assert (run_dir / f"{x['run_id']}.sh").read_text().startswith("#!/bin/bash\n")


def _wait_until(cond, what: str, timeout: float = 120, poll: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


STEPS = 100


def test_a_preempted_job_requeues_itself_and_resumes(slurm_cluster, tmp_path):  # noqa: F811
    logs = tmp_path / "logs"
    launcher = subprocess.Popen(_sweep(slurm_cluster, tmp_path, "--requeue", "--tag", "rq", steps=STEPS),
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(slurm_cluster.env, OMP_NUM_THREADS="1"))  # (the job inherits it)
    try:
        manifests = lambda: list((logs / "sweeps").glob("*.json")) if (logs / "sweeps").is_dir() else []  # noqa: E731
        _wait_until(lambda: manifests() and json.loads(manifests()[0].read_text())["runs"][0]["job_id"], "the job id")
        rec = json.loads(manifests()[0].read_text())["runs"][0]
        log_file = log_path(logs, rec["run_id"])
        # signalled at its first step: a run of STEPS tiny steps is still far from its end then
        _wait_until(lambda: log_file.is_file() and (read_log(log_file).last_step or 0) >= 1, "the run's first step",
                    poll=0.02)
        # what Slurm does --signal_s before the time limit: SIGTERM to the job's shell only
        subprocess.run(["scancel", "--signal=TERM", "--batch", rec["job_id"]], check=True, env=slurm_cluster.env)
        out, _ = launcher.communicate(timeout=240)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, out + slurm_cluster.log_tail()
    (x,) = json.loads(manifests()[0].read_text())["runs"]
    assert (x["status"], x["exit_code"], x["job_id"]) == ("finished", 0, rec["job_id"]), x
    log = read_log(log_file)
    # pre-empted at the end of a step with a checkpoint, then the requeued job went on from it
    (preempted,) = log.resumed_from
    assert 1 <= preempted < STEPS and log.finished and log.last_step == STEPS
    assert [r.step for r in log.train_steps] == list(range(1, STEPS + 1))
    lines = log_file.read_text().splitlines()
    assert [l.split()[0] for l in lines if l.startswith("status:")] == ["status:preempted", "status:finished"]
    after = lines[lines.index(f"resumed from step {preempted}") + 1:]
    assert next(l for l in after if l.startswith("step:")).startswith(f"step:{preempted + 1}/{STEPS} ")
    console = Path(x["output"]).read_text()
    assert "pre-empted: requeueing job" in console and "requeued (restart 1): resuming" in console


def test_array_dry_run_and_flags_that_need_slurm_or_array(tmp_path):
    logs = tmp_path / "logs"
    r = subprocess.run([*LAUNCHER, "sweeps/spectral_lr.toml", "--dry_run", "--slurm", "--array", "--array_parallel", "2",
                        "--requeue", "--time", "01:00:00", "--log_dir", str(logs)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # one array script for the 6 runs (same GPUs each), then the 6 command files its tasks read
    assert r.stdout.count("#SBATCH --array=0-5%2") == 1 and r.stdout.count("#SBATCH --requeue") == 1
    assert r.stdout.count("/array-1.sbatch\n") == 1 and r.stdout.count(".sh\n#!/bin/bash\n") == 6
    assert r.stdout.count('scontrol requeue "$SLURM_JOB_ID"') == 6
    assert not logs.exists()
    for flags, error in ((["--array"], "error: --array: only with --slurm"),
                         (["--slurm", "--array_parallel", "2"], "error: --array_parallel 2: only with --array"),
                         (["--slurm", "--array", "--array_parallel", "0"], "error: --array_parallel 0: must be >= 1")):
        r = subprocess.run([*LAUNCHER, "sweeps/spectral_lr.toml", "--dry_run", *flags, "--log_dir", str(logs)],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stderr.startswith(error), (flags, r.stderr)
