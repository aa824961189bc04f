"""Bad input on resume: a checkpoint from another config or model shape, a truncated or corrupt
file, a missing path, no run id for `latest`. Each stops the run before it starts with one
`error:` line naming the file and what is wrong, exit code 2, and the existing log untouched.
The runs are in-process (harness.trainer.main), so these tests take no start-up time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from checkpoint_runs import TINY
from base import UserError
from harness import checkpoint as ck
from harness.config import Config
from harness.logs.format import read_log
from harness.trainer import main

pytestmark = pytest.mark.usefixtures("local_corpus")  # runs with the default data/local (tests/conftest.py)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _main(tmp: Path, *extra: str) -> int:
    return main("train_gpt.py", [*TINY, "--num_scheduled_iterations", "2", "--val_loss_every", "0",
                                 "--log_dir", str(tmp / "logs"), "--checkpoint_dir", str(tmp / "ckpt"), *extra])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A finished 2-step run with its final checkpoint: (dir, checkpoint path, log path)."""
    tmp = tmp_path_factory.mktemp("saved")
    assert _main(tmp, "--run_id", "r", "--save_final") == 0
    return tmp, tmp / "ckpt" / "r" / "step_2.pt", tmp / "logs" / "r.txt"


def _refused(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_resume_from_another_config_names_file_and_fields(saved, capsys):
    tmp, path, log = saved
    before = log.read_bytes()
    code = _main(tmp, "--run_id", "r", "--resume", str(path), "--model_dim", "64", "--muon_lr", "0.02")
    line = _refused(capsys, code, str(path), "model_dim=32 in the checkpoint, 64 now", "muon_lr=0.05 in the checkpoint, 0.02 now")
    assert "save_every" in line  # it says which fields may differ
    assert log.read_bytes() == before


def test_fields_that_may_differ_do_not_block_resume(saved, capsys):
    tmp, path, log = saved
    code = _main(tmp, "--resume", str(path), "--save_every", "7", "--keep_last", "5", "--val_loss_every", "1")
    assert code == 0, capsys.readouterr().err
    assert "resumed from step 2" in log.read_text()  # no --run_id: the checkpoint's is taken


def test_resume_from_another_model_shape(saved, tmp_path, capsys):
    tmp, path, log = saved
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["embed.weight"] = torch.zeros(10, 32)
    bad = tmp_path / "step_2.pt"
    torch.save(ckpt, bad)
    before = log.read_bytes()
    code = _main(tmp, "--run_id", "r", "--resume", str(bad))
    _refused(capsys, code, str(bad), "embed.weight is (10, 32) in the checkpoint, (50304, 32) here")
    assert log.read_bytes() == before


@pytest.mark.parametrize("damage", ["truncated", "garbage_head", "flipped_tensor_bytes", "empty"])
def test_damaged_checkpoint_file(saved, tmp_path, capsys, damage):
    tmp, path, log = saved
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbage_head":
        data[100:164] = bytes(64)
    elif damage == "flipped_tensor_bytes":  # in the middle of the weights: only the CRC check sees it
        mid = len(data) // 2
        data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])
    else:
        data = bytearray()
    bad = tmp_path / "step_2.pt"
    bad.write_bytes(bytes(data))
    before = log.read_bytes()
    code = _main(tmp, "--run_id", "r", "--resume", str(bad))
    _refused(capsys, code, str(bad), "corrupt")
    assert log.read_bytes() == before


def test_missing_path_and_not_ours_and_pickle_payload(saved, tmp_path, capsys):
    tmp, _, log = saved
    before = log.read_bytes()
    _refused(capsys, _main(tmp, "--run_id", "r", "--resume", str(tmp_path / "nope.pt")),
             str(tmp_path / "nope.pt"), "no such checkpoint file")
    other = tmp_path / "other.pt"
    torch.save({"state": torch.zeros(2)}, other)
    _refused(capsys, _main(tmp, "--run_id", "r", "--resume", str(other)), str(other), "not a checkpoint of this harness")
    evil = tmp_path / "evil.pt"
    torch.save({"format": ck.FORMAT, "x": Evil()}, evil)
    _refused(capsys, _main(tmp, "--run_id", "r", "--resume", str(evil)), str(evil), "cannot read checkpoint")
    assert log.read_bytes() == before


def test_latest_needs_run_id_and_a_checkpoint(saved, capsys):
    tmp, _, _ = saved
    _refused(capsys, _main(tmp, "--resume", "latest"), "--resume latest needs the run id")
    _refused(capsys, _main(tmp, "--run_id", "ghost", "--resume", "latest"), str(tmp / "ckpt" / "ghost"),
             "no checkpoint to resume from")
    assert not (tmp / "logs" / "ghost.txt").exists()


def test_checkpoint_of_another_run_id(saved, capsys):
    tmp, path, _ = saved
    _refused(capsys, _main(tmp, "--run_id", "other", "--resume", str(path)), str(path), "run_id 'r', not 'other'")
    assert not (tmp / "logs" / "other.txt").exists()


def test_latest_skips_a_damaged_newest_checkpoint(saved, tmp_path, capsys):
    _, path, _ = saved
    d = tmp_path / "ckpt" / "r"
    d.mkdir(parents=True)
    (d / "step_2.pt").write_bytes(path.read_bytes())
    (d / "step_4.pt").write_bytes(path.read_bytes()[:1000])
    cfg = Config(run_id="r", resume="latest", checkpoint_dir=str(tmp_path / "ckpt"))
    chosen, ckpt = ck.resolve(cfg)
    assert chosen == d / "step_2.pt" and ckpt["step"] == 2
    assert "skipping damaged checkpoint" in capsys.readouterr().err
    (d / "step_2.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="no valid checkpoint among 2"):
        ck.resolve(cfg)


def test_resume_ends_a_log_line_cut_by_the_kill(saved, capsys):
    tmp, path, log = saved
    with open(log, "a") as f:
        f.write("step:3/2 train_ti")  # what a kill in the middle of a write could leave
    assert _main(tmp, "--resume", str(path)) == 0, capsys.readouterr().err
    lines = log.read_text().splitlines()
    i = lines.index("step:3/2 train_ti")
    assert lines[i + 1] == "resumed from step 2"
    parsed = read_log(log)
    assert parsed.status == "finished" and parsed.resumed_from[-1] == 2
