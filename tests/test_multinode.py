"""Two nodes on one machine: two torchrun agents (2 processes each) meet at a c10d rendezvous,
as on a real multi-node job, and form one 4-rank run. Each agent has its own working
directory and environment, so each has its own LOCAL_RANK 0. The run log and the checkpoints
are written once, by global rank 0 only, and the losses are those of a 4-rank --standalone run
of the same config."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from train_utils import ROOT, SMALL, VENV_BIN, log_of, losses, run_train

pytestmark = pytest.mark.timeout(300)

SAVES = ["--save_every", "3", "--save_final"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent(node_rank: int, port: int, cwd, args: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", NODE_NAME=f"node{node_rank}")
    cmd = [str(VENV_BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"twonodes{port}", "--node_rank", str(node_rank),
           "--max_restarts", "0", str(ROOT / "train_gpt.py"), *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_torchrun_agents_form_one_run_that_writes_once(tmp_path, shards_dir):
    logs, ckpt = tmp_path / "logs", tmp_path / "ckpt"
    args = [*SMALL, *SAVES, "--run_id", "run", "--log_dir", str(logs), "--checkpoint_dir", str(ckpt),
            "--train_files", str(shards_dir / "local_train_*.bin"), "--val_files", str(shards_dir / "local_val_*.bin")]
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for d in nodes:
        d.mkdir()
    port = _free_port()
    agents = [_agent(i, port, nodes[i], args) for i in (0, 1)]
    outs = []
    for a in agents:
        try:
            outs.append(a.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for b in agents:
                b.kill()
            raise
    for a, out in zip(agents, outs):
        assert a.returncode == 0, out[-4000:]

    # one log: one header, every step once, one final status
    assert sorted(p.name for p in logs.iterdir()) == ["run.txt"]
    text = (logs / "run.txt").read_text()
    lines = text.splitlines()
    assert sum(l.startswith("runlog:") for l in lines) == 1 and sum(l.startswith("config: ") for l in lines) == 1
    assert [l.split()[0] for l in lines if l.startswith("status:")] == ["status:finished"]
    log = log_of(tmp_path)
    assert log.finished and log.config["world_size"] == 4
    steps = [r.step for r in log.train_steps]
    assert steps == list(range(1, 7))
    # the checkpoints of global rank 0 only: no second writer, no temp file left behind
    assert sorted(p.name for p in (ckpt / "run").iterdir()) == ["step_3.pt", "step_6.pt"]
    assert sum(l.startswith("checkpoint: ") for l in lines) == 2
    # nothing written relative to either node's working directory
    assert [list(d.iterdir()) for d in nodes] == [[], []]
    # the run log's console echo comes from one agent only (the one holding global rank 0)
    assert sum(l.startswith("status:finished") for out in outs for l in out.splitlines()) == 1

    alone = tmp_path / "standalone"
    proc = run_train(alone, shards_dir, *SAVES, "--checkpoint_dir", str(alone / "ckpt"), nproc=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(log) == losses(log_of(alone))
