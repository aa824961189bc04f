"""The local executor: GPU packing logic, outcomes, manifest, summary; and real sweeps of the
real trainer at a tiny size on CPU: --parallel 2 with diverging runs, sequential with one
run's torchrun killed -9 then --resume, and Ctrl-C."""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from base import atomic_write
from harness.logs.format import log_path, read_log
from harness.sweep.launch import baseline_loss, exit_status, summary_table
from harness.sweep.local import cpu_threads_per_run, pick_gpus, plan_starts
from harness.sweep.manifest import Manifest, RunRecord, outcome
from harness.logs.format import parse_text
from sweep_utils import LAUNCHER, held_env, manifest_doc, processes_mentioning, running_with_steps, tiny_sets, wait_for

pytestmark = pytest.mark.usefixtures("local_corpus")  # runs with the default data/local (tests/conftest.py)



# ------------------------------------------------------------------------------------------
# Packing


def test_pick_gpus_prefers_aligned_blocks():
    all8 = [str(i) for i in range(8)]
    assert pick_gpus(all8, all8, 4) == ["0", "1", "2", "3"]
    assert pick_gpus(["1", "2", "3", "4", "5", "6", "7"], all8, 4) == ["4", "5", "6", "7"]
    assert pick_gpus(["1", "2", "3", "4", "5"], all8, 2) == ["2", "3"]  # aligned pair first
    assert pick_gpus(["1", "2", "5"], all8, 2) == ["1", "2"]  # then contiguous
    assert pick_gpus(["0", "3", "6"], all8, 2) == ["0", "3"]  # then lowest free
    assert pick_gpus(["0"], all8, 2) is None


def test_plan_starts_packs_disjoint_sets_first_fit():
    all8 = [str(i) for i in range(8)]
    starts = plan_starts([("a", 4), ("b", 2), ("c", 4), ("d", 2), ("e", 1)], all8, all8, running=0, parallel=None)
    assert [k for k, _ in starts] == ["a", "b", "d"]  # c no longer fits; d and e fill... d takes the last two
    used = [g for _, gs in starts for g in gs]
    assert len(used) == len(set(used)) == 8
    assert dict(starts)["a"] == ["0", "1", "2", "3"] and dict(starts)["b"] == ["4", "5"] and dict(starts)["d"] == ["6", "7"]
    # two of three 3-GPU runs at once on 8 GPUs; the third waits
    assert [k for k, _ in plan_starts([("x", 3), ("y", 3), ("z", 3)], all8, all8, 0, None)] == ["x", "y"]
    # with GPUs 0-3 busy a later small run starts before a big one that cannot fit
    assert plan_starts([("big", 8), ("small", 1)], all8[4:], all8, 1, None) == [("small", ["4"])]
    # a cap on concurrency; and CPU (no GPUs): only --parallel limits
    assert len(plan_starts([("a", 1)] * 8, all8, all8, 0, 3)) == 3
    assert plan_starts([("a", 2), ("b", 2), ("c", 2)], [], [], running=1, parallel=2) == [("a", None)]
    assert plan_starts([("a", 1)], [], [], running=0, parallel=1) == [("a", None)]


# ------------------------------------------------------------------------------------------
# Outcomes, manifest, summary


def test_outcome_log_status_wins_then_exit_code(tmp_path):
    fin = parse_text("runlog:1 run_id:x\nstep:4/4 val_loss:3.5 train_time:1ms step_avg:1ms\nstatus:finished final_val_loss:3.5000 step:4\n")
    assert outcome(0, fin) == ("finished", "")
    failed = parse_text("runlog:1 run_id:x\nstatus:failed reason:RuntimeError:boom step:2\n")
    assert outcome(1, failed) == ("failed", "RuntimeError:boom")
    assert outcome(3, None) == ("diverged", "")
    assert outcome(130, None) == ("interrupted", "")
    assert outcome(-9, parse_text("runlog:1 run_id:x\nstep:1/4 train_time:1ms step_avg:1ms\n")) == ("failed", "killed by SIGKILL")
    assert outcome(0, parse_text("runlog:1 run_id:x\n")) == ("failed", "exit code 0 but the log has no status:finished line")
    out = tmp_path / "run.out"
    out.write_text("Traceback...\nerror: data/x_*.bin: no files match\n")
    assert outcome(2, None, str(out)) == ("failed", "bad input: error: data/x_*.bin: no files match")
    assert outcome(137, None) == ("failed", "killed by SIGKILL")


def _rec(tag, seed, status, loss, baseline=False, script="train_gpt_muon_new.py", code=0):
    return RunRecord(key=f"{tag}@{seed}", tag=tag, seed=seed, script=script, nproc=1, baseline=baseline, swept={},
                     fields={}, run_id=f"{tag}-s{seed}-T", command=[], status=status, final_val_loss=loss, exit_code=code)


def test_summary_best_first_with_delta_against_baseline(tmp_path):
    m = Manifest(sweep_id="s-1", log_dir=str(tmp_path), runs=[
        _rec("base", 0, "finished", 3.30, baseline=True, script="train_gpt.py"),
        _rec("base", 1, "finished", 3.32, baseline=True, script="train_gpt.py"),
        _rec("ord_1", 0, "finished", 3.40), _rec("ord_0.1", 0, "finished", 3.25),
        _rec("ord_9", 0, "diverged", float("nan"), code=3), _rec("ord_5", 0, "failed", None, code=-9),
    ])
    assert baseline_loss(m.runs)[0] == pytest.approx(3.31)
    text = summary_table(m)
    rows = [l.split() for l in text.splitlines() if l[:1].isdigit()]
    assert [r[1] for r in rows] == ["ord_0.1", "base", "base", "ord_1", "ord_5", "ord_9"]
    assert rows[0][6] == "-0.0600" and rows[3][6] == "+0.0900" and rows[1][2] == "*"
    assert "by tag (finished runs):" in text and re.search(r"\nbase +2 +3\.3100 +0\.0141 +\+0\.0000\n", text)
    assert exit_status(m, completed=True) == 1 and exit_status(m, completed=False) == 130
    m.runs = m.runs[:4]
    assert exit_status(m, completed=True) == 0
    # the manifest round-trips (NaN as text in JSON) and no temp file is left behind
    m.runs.append(_rec("ord_9", 0, "diverged", float("nan"), code=3))
    m.save()
    back = Manifest.load(tmp_path, "s-1")
    assert [r.to_json() for r in back.runs] == [r.to_json() for r in m.runs]
    assert json.loads(m.path.read_text())["runs"][-1]["final_val_loss"] == "nan"
    assert [p.name for p in m.path.parent.iterdir()] == ["s-1.json"]
    atomic_write(m.path, json.dumps({"x": 1}))
    assert json.loads(m.path.read_text()) == {"x": 1}


# ------------------------------------------------------------------------------------------
# Real sweeps


@pytest.mark.multiprocess
def test_cpu_threads_per_run_shares_the_cores():
    assert cpu_threads_per_run(1, 1, cpus=16) == 16
    assert cpu_threads_per_run(2, 1, cpus=16) == 8
    assert cpu_threads_per_run(3, 2, cpus=16) == 2  # 6 processes on 16 cores: 2 each, none oversubscribed
    assert cpu_threads_per_run(4, 1, cpus=2) == 1  # never 0
    assert cpu_threads_per_run(1, 1) >= 1


def test_parallel_2_grid_x_2_seeds_with_diverging_runs(tmp_path):
    logs = tmp_path / "logs"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the launcher splits the cores
    r = subprocess.run([*LAUNCHER, "--grid", "adam_lr=0.008,1e37", "--seeds", "0,1", "--set", "logit_softcap=0",
                        "--tag", "head", "--parallel", "2", "--log_dir", str(logs), *tiny_sets(3)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 1, r.stdout + r.stderr  # some runs did not finish
    doc = manifest_doc(logs)
    runs = {(x["tag"], x["seed"]): x for x in doc["runs"]}
    assert set(runs) == {("head_0.008", 0), ("head_0.008", 1), ("head_1e+37", 0), ("head_1e+37", 1)}
    for seed in (0, 1):
        good, bad = runs[("head_0.008", seed)], runs[("head_1e+37", seed)]
        assert (good["status"], good["exit_code"]) == ("finished", 0)
        assert (bad["status"], bad["exit_code"]) == ("diverged", 3)
        log = read_log(log_path(logs, good["run_id"]))
        assert good["final_val_loss"] == log.final_val_loss and log.finished
        # tag and every swept value are in the log's config line
        assert (log.config["tag"], log.config["seed"], log.config["adam_lr"]) == ("head_0.008", seed, 0.008)
        assert read_log(log_path(logs, bad["run_id"])).config["adam_lr"] == 1e37
        assert log.env["threads"] == cpu_threads_per_run(2, 1)  # two side by side share the cores
        assert good["command"][0] == sys.executable and "--run_id" in good["command"]
    # two at a time: some run started before another ended
    spans = sorted((x["started"], x["ended"]) for x in doc["runs"])
    assert any(spans[i + 1][0] < spans[i][1] for i in range(3))
    assert doc["executor"]["parallel"] == 2
    # the summary: finished runs first, best first
    table = r.stdout[r.stdout.index("#  tag"):].split("\n\n")[0].splitlines()[2:]
    assert [l.split()[3] for l in table] == ["finished", "finished", "diverged", "diverged"]
    losses = [float(l.split()[5]) for l in table[:2]]
    assert losses == sorted(losses)
    assert "by tag (finished runs):" in r.stdout and "baseline: none finished (no delta)" in r.stdout
    # resume keeping diverged results: nothing to do, nothing started
    n_logs = len(list(logs.glob("*.txt")))
    r2 = subprocess.run([*LAUNCHER, "--resume", doc["sweep_id"], "--keep_diverged", "--log_dir", str(logs)],
                        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r2.returncode == 1 and "0 run(s) to do of 4" in r2.stdout
    assert len(list(logs.glob("*.txt"))) == n_logs


@pytest.mark.multiprocess
@pytest.mark.slow
def test_sequential_kill9_of_one_torchrun_then_resume_reruns_only_it(tmp_path):
    logs = tmp_path / "logs"
    sweep = tmp_path / "ord.toml"
    sweep.write_text('name = "ord"\n[defaults]\nseeds = [0]\n[[grids]]\ntag = "ord"\nscript = "train_gpt_muon_new.py"\n'
                     "[grids.axes]\nspectral_lr_mul = [0.0, 1.0]\n")
    env, release = held_env(tmp_path, 1)  # each run holds after step 1 until `release` exists
    launcher = subprocess.Popen([*LAUNCHER, str(sweep), "--torchrun", "always", "--log_dir", str(logs), *tiny_sets(6)],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        (victim,) = wait_for(lambda: running_with_steps(logs, 1), 120, "the first run's first step")
        assert Path(victim["command"][0]).name == "torchrun"
        os.kill(victim["pid"], signal.SIGKILL)
        # release the hold only once the launcher has recorded the kill (and stopped the orphaned
        # worker): released earlier, the orphan could finish the run within one poll
        wait_for(lambda: [x for x in manifest_doc(logs)["runs"]
                          if x["run_id"] == victim["run_id"] and x["status"] != "running"], 60, "the kill recorded")
        release.touch()  # the other run goes through
        out, _ = launcher.communicate(timeout=300)
    finally:
        release.touch()  # never leave a run holding
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 1, out
    doc = manifest_doc(logs)
    by_id = {x["run_id"]: x for x in doc["runs"]}
    v = by_id[victim["run_id"]]
    assert (v["status"], v["exit_code"], v["reason"]) == ("failed", -9, "killed by SIGKILL"), v
    assert not processes_mentioning(victim["run_id"])  # its orphaned worker was stopped too
    assert read_log(log_path(logs, victim["run_id"])).status is None
    others = [x for x in doc["runs"] if x["run_id"] != victim["run_id"]]
    assert len(others) == 1 and all(x["status"] == "finished" and x["final_val_loss"] > 0 for x in others)
    spans = sorted((x["started"], x["ended"]) for x in doc["runs"])
    assert spans[0][1] <= spans[1][0]  # sequential by default
    # resume: only the killed run again, under a new run id; the old log is left as it was
    old_log = log_path(logs, victim["run_id"]).read_bytes()
    r = subprocess.run([*LAUNCHER, "--resume", doc["sweep_id"], "--log_dir", str(logs)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 run(s) to do of 2" in r.stdout
    doc2 = manifest_doc(logs)
    assert all(x["status"] == "finished" for x in doc2["runs"])
    again = next(x for x in doc2["runs"] if x["key"] == victim["key"])
    assert again["run_id"] != victim["run_id"] and again["attempts"][0]["run_id"] == victim["run_id"]
    assert again["attempts"][0]["status"] == "failed" and "torchrun" in again["command"][0]
    assert {x["run_id"] for x in doc2["runs"]} - {again["run_id"]} == {x["run_id"] for x in others}
    assert {x["started"] for x in others} <= {x["started"] for x in doc2["runs"]}  # not rerun
    assert log_path(logs, victim["run_id"]).read_bytes() == old_log
    assert read_log(log_path(logs, again["run_id"])).finished


@pytest.mark.multiprocess
def test_ctrl_c_stops_children_and_they_checkpoint(tmp_path):
    """Ctrl-C: the launcher passes SIGINT to the runs, which the trainer treats like SIGTERM
    (checkpoint, status:preempted, exit 0), so --resume can continue them (issue 19)."""
    logs = tmp_path / "logs"
    launcher = subprocess.Popen([*LAUNCHER, "--grid", "spectral_lr_mul=0,1", "--script", "train_gpt_muon_new.py",
                                 "--parallel", "2", "--log_dir", str(logs), "--set", f"checkpoint_dir={tmp_path / 'ckpt'}",
                                 *tiny_sets(200)],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        running = wait_for(lambda: running_with_steps(logs, 2), 120, "both runs training")
        launcher.send_signal(signal.SIGINT)
        out, _ = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 130, out
    assert "SIGINT: stopping 2 run(s)" in out
    doc = manifest_doc(logs)
    assert [x["status"] for x in doc["runs"]] == ["preempted", "preempted"]
    for x in running:
        assert not processes_mentioning(x["run_id"])
        log = read_log(log_path(logs, x["run_id"]))
        assert log.status == "preempted" and not log.finished  # the trainer wrote its own status line
        assert (tmp_path / "ckpt" / x["run_id"] / f"step_{int(log.status_fields['step'])}.pt").exists()
    assert [x["exit_code"] for x in doc["runs"]] == [0, 0]


def test_plan_resume_continues_preempted_reruns_unfinished_keeps_finished(tmp_path):
    from harness.sweep.launch import plan_resume

    def rec(tag, status):
        r = _rec(tag, 0, status, None, script="train_gpt.py")
        r.command = [sys.executable, "train_gpt.py", "--run_id", r.run_id]
        return r

    head = "runlog:1 run_id:{}\nstep:2/4 train_time:1ms step_avg:1ms train_loss:5.0\n"
    ends = {"fin": "step:4/4 val_loss:3.5 train_time:1ms step_avg:1ms\nstatus:finished final_val_loss:3.5000 step:4\n",
            "pre": "status:preempted step:2\n", "div": "status:diverged step:2\n", "bad": "status:failed reason:X step:2\n",
            "dead": ""}
    m = Manifest(sweep_id="s-2", log_dir=str(tmp_path), runs=[rec(t, "running") for t in [*ends, "never"]])
    m.runs[-1].status = "pending"
    for r in m.runs[:-1]:
        log_path(tmp_path, r.run_id).write_text(head.format(r.run_id) + ends[r.tag])
    old = {r.tag: r.run_id for r in m.runs}
    todo = plan_resume(m, python=sys.executable)
    by_tag = {r.tag: r for r in m.runs}
    assert [r.tag for r in todo] == ["pre", "div", "bad", "dead", "never"]
    assert by_tag["fin"].status == "finished" and by_tag["fin"].final_val_loss == 3.5 and by_tag["fin"].run_id == old["fin"]
    pre = by_tag["pre"]
    assert pre.run_id == old["pre"] and pre.command[-2:] == ["--resume", "latest"] and pre.status == "pending"
    for tag in ("div", "bad", "dead", "never"):
        r = by_tag[tag]
        assert r.run_id != old[tag] and r.run_id.startswith(f"lrmul-1-1-1-1-cd0.5-{tag}-") and "--resume" not in r.command
        assert r.attempts[-1]["run_id"] == old[tag] and r.command[r.command.index("--run_id") + 1] == r.run_id
    assert by_tag["bad"].attempts[-1]["status"] == "running"
    # diverged results can be kept
    m2 = Manifest(sweep_id="s-3", log_dir=str(tmp_path), runs=[rec("div", "diverged")])
    m2.runs[0].run_id = old["div"]
    assert plan_resume(m2, keep_diverged=True) == []


@pytest.mark.cuda
@pytest.mark.multiprocess
def test_gpu_packing_runs_one_gpu_runs_side_by_side(tmp_path):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("packing needs a node with at least 2 GPUs")
    logs = tmp_path / "logs"
    r = subprocess.run([*LAUNCHER, "--grid", "spectral_lr_mul=0,1", "--script", "train_gpt_muon_new.py",
                        "--log_dir", str(logs), "--set", "compile=off", *tiny_sets(20)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = manifest_doc(logs)
    gpus = [x["gpus"] for x in doc["runs"]]
    assert all(len(g) == 1 for g in gpus) and gpus[0] != gpus[1]  # disjoint CUDA_VISIBLE_DEVICES
    (a0, a1), (b0, b1) = sorted((x["started"], x["ended"]) for x in doc["runs"])
    assert b0 < a1  # side by side, without --parallel
    for x in doc["runs"]:
        assert read_log(log_path(logs, x["run_id"])).env["device"] != "cpu"


@pytest.mark.multiprocess
def test_sigterm_preempts_and_resume_continues_the_same_run(tmp_path):
    """SIGTERM to the launcher (what Slurm sends it) reaches the run: the trainer checkpoints and
    writes status:preempted; --resume continues that run id with --resume latest, same log."""
    logs = tmp_path / "logs"
    env, release = held_env(tmp_path, 2)  # the run holds after step 2 until SIGTERM reaches it
    launcher = subprocess.Popen([*LAUNCHER, "--grid", "spectral_lr_mul=0.5", "--script", "train_gpt_muon_new.py",
                                 "--log_dir", str(logs), "--set", f"checkpoint_dir={tmp_path / 'ckpt'}", *tiny_sets(8)],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        (run,) = wait_for(lambda: running_with_steps(logs, 1, at_step=2), 120, "the run's step 2")
        launcher.send_signal(signal.SIGTERM)
        out, _ = launcher.communicate(timeout=120)
    finally:
        release.touch()  # never leave a run holding
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 130, out
    (x,) = manifest_doc(logs)["runs"]
    log = read_log(log_path(logs, run["run_id"]))
    assert log.status == "preempted" and (x["status"], x["exit_code"]) == ("preempted", 0), out
    stopped_at = int(log.status_fields["step"])
    assert stopped_at == 2  # where it held: the signal came mid-run
    r = subprocess.run([*LAUNCHER, "--resume", manifest_doc(logs)["sweep_id"], "--log_dir", str(logs)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (x,) = manifest_doc(logs)["runs"]
    assert x["run_id"] == run["run_id"] and x["command"][-2:] == ["--resume", "latest"] and x["status"] == "finished"
    log = read_log(log_path(logs, run["run_id"]))
    assert log.finished and log.resumed_from == [stopped_at] and log.last_step == 8
    assert x["final_val_loss"] == log.final_val_loss and x["attempts"][0]["status"] == "preempted"
