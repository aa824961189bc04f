"""train_gpt.py end to end as a real subprocess: the log, bad input, divergence."""

import json
import math

import numpy as np
import pytest

from data.shards import write_shard
from harness.logs.format import read_log
from train_utils import error_lines, log_of, losses, run_train


def test_small_run_writes_the_contracted_log(tmp_path, shards_dir):
    proc = run_train(tmp_path, shards_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "logs" / "run.txt").read_text()
    assert text.startswith("runlog:1 run_id:run\n" + "=" * 100 + "\n# source: train_gpt.py\n")
    assert "# source: harness/trainer.py" in text and "# source: data/loader.py" in text
    log = log_of(tmp_path)
    assert log.ours and log.run_id == "run" and log.status == "finished"
    assert log.config["script"] == "train_gpt.py" and log.config["world_size"] == 1
    assert log.env["torch"] and log.env["git_commit"]
    assert [r.step for r in log.train_steps] == [1, 2, 3, 4, 5, 6]
    assert [r.step for r in log.val_steps] == [0, 3, 6]
    assert all(r.total == 6 for r in log.train_steps)
    assert log.val_steps[0].val_loss == pytest.approx(np.log(50304), abs=1e-3)  # zero-initialised head
    assert log.final_val_loss == log.val_steps[-1].val_loss < log.val_steps[0].val_loss
    for r in log.train_steps:
        assert {"train_loss", "train_time", "step_avg", "lr_mul", "batch_size"} <= set(r.values)
    assert "run log:" in proc.stdout
    done = [line for line in proc.stdout.splitlines() if line.startswith("done: ")]
    train_s = log.train_steps[-1].train_time_ms / 1000
    assert done == [f"done: val loss {log.final_val_loss:.4f} after 6 steps; {train_s:.0f} s of training,"
                    f" {done[0].split(', ')[-1]}"] and done[0].endswith(" s in all")


def test_divergence_exits_nonzero_with_status(tmp_path, shards_dir):
    # without the soft-cap, a head that jumps to 1e37 overflows the logits to inf and the loss to nan
    proc = run_train(tmp_path, shards_dir, "--logit_softcap", "0", "--adam_lr", "1e37")
    assert proc.returncode == 3, proc.stderr[-2000:]
    log = log_of(tmp_path)
    assert log.status == "diverged" and "step" in log.status_fields
    assert any("diverged" in line for line in error_lines(proc))


def test_crash_ends_the_log_with_failed(tmp_path, shards_dir, monkeypatch):
    # a fault injected into the optimizer mid-run, in-process: any crash ends the log as failed
    from harness import optim, trainer
    from train_utils import SMALL

    def broken(self, step, lr_mul):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(optim.LabelledAdam, "step", broken)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    code = trainer.main("train_gpt.py", [*SMALL, "--log_dir", str(tmp_path / "logs"), "--run_id", "run",
                                         "--train_files", str(shards_dir / "local_train_*.bin"),
                                         "--val_files", str(shards_dir / "local_val_*.bin")])
    assert code == 1
    log = log_of(tmp_path)
    assert log.status == "failed" and "RuntimeError:injected" in str(log.status_fields["reason"])


def _bad_shard(path, magic=20240520, version=1, n=1000, truncate=0):
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, n
    data = header.tobytes() + np.zeros(n, dtype="<u2").tobytes()
    path.write_bytes(data[: len(data) - truncate])


@pytest.mark.parametrize(
    "case, needle",
    [
        ("missing_dir", "no shards match"),
        ("empty_dir", "has no .bin shards"),
        ("bad_magic", "magic"),
        ("bad_version", "version"),
        ("truncated", "truncated"),
        ("short_val", "val_tokens"),
        ("batch", "divisible by world_size x seq_len"),
        ("preset", "preset='nope'"),
        ("list_env", "BATCH_SIZES"),
        ("run_id", "run_id="),
        ("existing_log", "already exists"),
    ],
)
@pytest.mark.multiprocess
def test_bad_input_is_one_clear_line(tmp_path, shards_dir, case, needle):
    args, env, run_id = [], {}, "run"
    bad = tmp_path / "bad"
    bad.mkdir()
    train = str(shards_dir / "local_train_*.bin")
    if case == "missing_dir":
        args = ["--train_files", str(tmp_path / "nowhere" / "*.bin")]
    elif case == "empty_dir":
        args = ["--train_files", str(bad)]
    elif case in ("bad_magic", "bad_version", "truncated"):
        kw = {"bad_magic": {"magic": 123}, "bad_version": {"version": 7}, "truncated": {"truncate": 10}}[case]
        _bad_shard(bad / "x_train_000000.bin", **kw)
        args = ["--train_files", str(bad / "x_train_*.bin")]
    elif case == "short_val":
        write_shard(bad / "v_000000.bin", np.arange(100) % 1000)
        args = ["--val_files", str(bad / "v_*.bin"), "--train_files", train]
    elif case == "batch":
        args = ["--batch_sizes", "352,384,384,384"]  # 11 sequences of 32 cannot split over 2 ranks
    elif case == "preset":
        args = ["--preset", "nope"]
    elif case == "list_env":
        env = {"BATCH_SIZES": "12,,x"}
    elif case == "run_id":
        run_id = "../escape"
    elif case == "existing_log":
        (tmp_path / "logs").mkdir()
        (tmp_path / "logs" / "run.txt").write_text("precious\n")
    nproc = 2 if case == "batch" else 1
    proc = run_train(tmp_path, shards_dir, *args, env=env, run_id=run_id, nproc=nproc)
    # the workers exit 2; torchrun reports any failed worker as its own exit 1 (and its summary)
    assert proc.returncode == (2 if nproc == 1 else 1), (proc.returncode, proc.stderr[-2000:])
    errors = error_lines(proc)
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]  # rank 0 only
    if nproc == 1:
        assert "Traceback" not in proc.stderr
    logs = list((tmp_path / "logs").glob("*.txt")) if (tmp_path / "logs").exists() else []
    if case == "existing_log":
        assert (tmp_path / "logs" / "run.txt").read_text() == "precious\n"
    else:
        assert logs == []  # bad input is caught before any log is written


def test_out_of_vocabulary_tokens_are_an_error(tmp_path, shards_dir):
    bad = tmp_path / "bad"
    write_shard(bad / "t_000000.bin", np.full(5000, 60000))
    proc = run_train(tmp_path, shards_dir, "--train_files", str(bad / "t_*.bin"))
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert "t_000000.bin" in line and "60000" in line and "vocab" in line


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_ranks_and_accumulation(tmp_path, shards_dir):
    """2 gloo ranks, 2 micro-batches each: the same losses as 1 rank with 4 micro-batches."""
    one = run_train(tmp_path / "a", shards_dir)
    two = run_train(tmp_path / "b", shards_dir, nproc=2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    la, lb = log_of(tmp_path / "a"), log_of(tmp_path / "b")
    assert lb.config["world_size"] == 2 and lb.env["backend"] == "gloo"
    np.testing.assert_allclose(losses(la), losses(lb), rtol=2e-5, atol=2e-5)


def test_config_line_has_tag_and_assignment(tmp_path, shards_dir):
    proc = run_train(tmp_path, shards_dir, "--tag", "mytag", "--seed", "3", "--num_scheduled_iterations", "1",
                     "--val_loss_every", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = read_log(tmp_path / "logs" / "run.txt").config
    assert cfg["tag"] == "mytag" and cfg["seed"] == 3
    assert cfg["param_assignment"]["blocks.0.attn.qkv"] == "muon"
    assert cfg["param_assignment"]["lm_head.weight"] == "adam_lm_head"
    # the whole line against the configuration resolved here from the same arguments
    from harness.config import Config, load_config
    from harness.model import GPT, ModelShape
    from train_utils import SMALL

    argv = [*SMALL, "--log_dir", str(tmp_path / "logs"), "--train_files", str(shards_dir / "local_train_*.bin"),
            "--val_files", str(shards_dir / "local_val_*.bin"), "--run_id", "run", "--tag", "mytag", "--seed", "3",
            "--num_scheduled_iterations", "1", "--val_loss_every", "0"]
    want = load_config(argv, overrides={"script": "train_gpt.py"}, prog="train_gpt.py").to_dict()
    got = dict(cfg)
    assignment, world = got.pop("param_assignment"), got.pop("world_size")
    assert world == 1 and got == json.loads(json.dumps(want))
    # every parameter of the model has exactly one optimizer; Muon only the hidden matrices,
    # Adam groups named by the fork's labels
    model = GPT(ModelShape.from_config(Config(**{k: v for k, v in got.items()})))
    params = dict(model.named_parameters())
    assert set(assignment) == set(params)
    for name, p in params.items():
        if name.startswith("embed."):
            assert assignment[name] == "adam_embed", name
        elif name.startswith("value_embeds."):
            assert assignment[name] == "adam_value_embed", name
        elif name.startswith("lm_head."):
            assert assignment[name] == "adam_lm_head", name
        else:
            assert assignment[name] == ("muon" if p.ndim >= 2 else "adam_scalars"), name


def test_compact_vocab_trains_on_renumbered_ids(tmp_path, shards_dir):
    """--compact_vocab: vocab_size becomes the ids the shards use (padded to 128), recorded in
    the config line; the zero-initialised head starts at exactly ln(V)."""
    from data.shards import compact_vocab, find_shards

    proc = run_train(tmp_path, shards_dir, "--compact_vocab")
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = log_of(tmp_path)
    _, used = compact_vocab(find_shards(str(shards_dir / "local_*.bin")))
    vocab = log.config["vocab_size"]
    assert log.config["compact_vocab"] is True and vocab == -(-used // 128) * 128 < 50304
    first, last = log.val_steps[0], log.val_steps[-1]
    assert first.step == 0 and abs(first.val_loss - math.log(vocab)) < 1e-4
    assert last.val_loss < first.val_loss - 1.0


@pytest.mark.multiprocess
@pytest.mark.slow
def test_gradient_clipping_is_the_same_at_one_and_two_ranks(tmp_path, shards_dir):
    """--grad_clip clips the averaged gradient by its global norm: 2 ranks match 1 rank, and
    the clip is active (the losses differ from an unclipped run). The gradient norm here grows
    from 1.6 to 5.6 over the 6 steps, so a clip of 1 acts from the second step on. Clipped runs
    amplify rounding differences more than unclipped ones (measured at 1 rank, 1 vs 2 micro-
    batches: 2e-5 relative with clip 1, 5e-4 with clip 0.05, 1e-5 without): hence rtol 1e-4."""
    one = run_train(tmp_path / "a", shards_dir, "--grad_clip", "1.0")
    two = run_train(tmp_path / "b", shards_dir, "--grad_clip", "1.0", nproc=2)
    plain = run_train(tmp_path / "c", shards_dir)
    assert one.returncode == 0 and two.returncode == 0 and plain.returncode == 0, two.stderr[-3000:]
    la, lb, lc = (losses(log_of(tmp_path / d)) for d in "abc")
    np.testing.assert_allclose(la, lb, rtol=1e-4, atol=1e-4)
    assert max(abs(x - y) for x, y in zip(la, lc)) > 1e-3


def test_config_from_the_environment_is_printed_and_logged(tmp_path, shards_dir):
    """A stray SEED in the shell changes the run: it must say so, on stderr and in the log."""
    proc = run_train(tmp_path, shards_dir, "--num_scheduled_iterations", "1", "--val_loss_every", "0",
                     env={"SEED": "7", "MUON_LR": "0.04"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "note: config from the environment: SEED=7 MUON_LR=0.04" in proc.stderr
    log = read_log(tmp_path / "logs" / "run.txt")
    assert log.config["seed"] == 7 and log.config["muon_lr"] == 0.04
    assert log.env["config_env"] == "SEED=7,MUON_LR=0.04"
    plain = run_train(tmp_path / "plain", shards_dir, "--num_scheduled_iterations", "1", "--val_loss_every", "0")
    assert plain.returncode == 0 and "config from the environment" not in plain.stderr
    assert read_log(tmp_path / "plain" / "logs" / "run.txt").env["config_env"] == "none"


def test_cpu_defaults_compact_vocab_and_random_windows_resume_exactly(tmp_path, shards_dir):
    """The tiny preset's data defaults: the compact vocabulary (step 0 at ln V of the padded
    compact table, V recorded in the log) and random windows, which a resumed run draws again."""
    defaults = ["--compact_vocab", "1", "--sampling", "random", "--save_every", "3", "--checkpoint_dir",
                str(tmp_path / "ckpt")]
    r = run_train(tmp_path / "a", shards_dir, *defaults)
    assert r.returncode == 0, r.stderr
    log = log_of(tmp_path / "a")
    vocab = log.config["vocab_size"]
    assert log.config["compact_vocab"] and log.config["sampling"] == "random" and vocab < 50304 and vocab % 128 == 0
    assert log.val_steps[0].val_loss == pytest.approx(np.log(vocab), abs=1e-3)  # zero-initialised head
    r = run_train(tmp_path / "b", shards_dir, *defaults[:-2], "--resume", str(tmp_path / "ckpt" / "run" / "step_3.pt"),
                  "--checkpoint_dir", str(tmp_path / "ckpt_b"))
    assert r.returncode == 0, r.stderr
    again = log_of(tmp_path / "b")
    assert [s.train_loss for s in again.train_steps if s.step > 3] == [s.train_loss for s in log.train_steps if s.step > 3]
    assert again.final_val_loss == log.final_val_loss
