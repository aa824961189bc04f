"""export_weights.py and sample.py on real checkpoints of 3-step tiny runs (train_gpt.py
--save_final), one with compact_vocab and one with GPT-2's full vocabulary: the safetensors file
is a real one holding the checkpoint's tensors, the reloaded model's logits equal the original's,
sample.py is deterministic for a seed and its greedy text is the argmax loop computed here, and
bad input is one `error:` line with exit 2."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint_runs import run as run_train_tiny
from data.shards import find_shards, used_token_ids
from data.tokenizer import EOT, gpt2_encoding
from harness import checkpoint as ckpt_io
from harness.export import load_model
from harness.model import GPT, ModelShape

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
PROMPT = "def main(argv):\n    "


def cli(script: str, *args, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([PY, str(ROOT / script), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, local_corpus):
    """{"compact": step_3.pt, "full": step_3.pt} of two 3-step tiny runs."""
    tmp = tmp_path_factory.mktemp("runs")
    data = ["--train_files", str(local_corpus / "local_train_*.bin"), "--val_files", str(local_corpus / "local_val_*.bin"),
            "--num_scheduled_iterations", "3", "--val_loss_every", "0", "--save_final"]
    out = {}
    for name, extra in (("compact", ["--compact_vocab", "1"]), ("full", [])):
        r = run_train_tiny(tmp, name, *data, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = tmp / "ckpt" / name / "step_3.pt"
        assert out[name].is_file()
    return out


@pytest.fixture(scope="module")
def exports(ckpts, tmp_path_factory):
    """export_weights.py (a real subprocess) of both checkpoints: {"compact": DIR, "full": DIR}."""
    out = {}
    for kind, path in ckpts.items():
        out[kind] = tmp_path_factory.mktemp("exp") / kind
        r = cli("export_weights.py", "--checkpoint", path, "--out", out[kind])
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == [f"wrote {out[kind] / 'model.safetensors'}", f"wrote {out[kind] / 'config.json'}"]
    return out


@functools.lru_cache(maxsize=None)
def shard_ids(train: str, val: str) -> tuple[int, ...]:
    return tuple(used_token_ids(find_shards(train, "train") + find_shards(val, "val")).tolist())


def original_model(path: Path) -> tuple[GPT, dict]:
    ckpt = ckpt_io.load(path)
    cfg = ckpt["config"]
    model = GPT(ModelShape(**{f: cfg[f] for f in ModelShape.__dataclass_fields__}))
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


@pytest.mark.parametrize("kind", ["compact", "full"])
def test_export_roundtrip(ckpts, exports, kind, local_corpus):
    from safetensors.torch import load_file

    out = exports[kind]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no temp files left
    model, ckpt = original_model(ckpts[kind])
    # a real safetensors file with exactly the checkpoint's tensors
    tensors = load_file(str(out / "model.safetensors"))
    assert set(tensors) == set(ckpt["model"])
    assert all(torch.equal(tensors[k], ckpt["model"][k]) for k in tensors)
    meta = json.loads((out / "config.json").read_text())
    assert meta["model"] == "gpt" and meta["shape"]["vocab_size"] == ckpt["config"]["vocab_size"]
    assert meta["shape"]["num_layers"] == 2 and meta["shape"]["model_dim"] == 32 and meta["seq_len"] == 16
    assert meta["source"]["step"] == 3 and meta["vocab"]["tokenizer"] == "gpt2"
    if kind == "compact":
        ids = shard_ids(str(local_corpus / "local_train_*.bin"), str(local_corpus / "local_val_*.bin"))
        assert meta["vocab"]["compact"] and meta["vocab"]["token_ids"] == list(ids)
        assert ckpt["config"]["vocab_size"] < 50257
    else:
        assert not meta["vocab"]["compact"] and meta["vocab"]["token_ids"] is None
        assert meta["vocab"]["model_vocab_size"] == 50304
    # the model rebuilt from the export (and straight from the checkpoint) gives the same logits
    idx = torch.randint(0, min(meta["vocab"]["model_vocab_size"], 5000), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.logits(idx)
        for source in (out, ckpts[kind]):
            again, vocab, _ = load_model(source)
            assert torch.equal(again.logits(idx), want)
    assert vocab.n_real == (len(meta["vocab"]["token_ids"]) if kind == "compact" else 50257)


def argmax_text(ckpt_path: Path, prompt: str, n: int) -> str:
    """Greedy decoding written out here: <|endoftext|> + the prompt's GPT-2 ids (renumbered for a
    compact vocabulary), argmax over the real tokens at the last position, the last seq_len tokens
    as context, stop at <|endoftext|>."""
    model, ckpt = original_model(ckpt_path)
    cfg = ckpt["config"]
    enc = gpt2_encoding()
    gpt2 = [EOT] + enc.encode_ordinary(prompt)
    if cfg["compact_vocab"]:
        ids = list(shard_ids(cfg["train_files"], cfg["val_files"]))
        to_model, to_gpt2, n_real = {t: i for i, t in enumerate(ids)}, ids, len(ids)
    else:
        to_model, to_gpt2, n_real = None, None, 50257
    x = [to_model[t] for t in gpt2] if to_model else gpt2
    eot = to_model[EOT] if to_model else EOT
    new = []
    with torch.no_grad():
        for _ in range(n):
            logits = model.logits(torch.tensor([x[-cfg["seq_len"]:]]))[0, -1, :n_real]
            t = int(logits.argmax())
            if t == eot:
                break
            new.append(t)
            x.append(t)
    return prompt + enc.decode([to_gpt2[t] for t in new] if to_gpt2 else new)


def sample_in_process(capsys, *args) -> str:
    import sample

    assert sample.main([str(a) for a in args]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("kind", ["compact", "full"])
def test_sample_greedy_and_seeded(ckpts, exports, kind, capsys):
    exp = exports[kind]
    greedy = cli("sample.py", "--checkpoint", exp, "--prompt", PROMPT, "--max_new_tokens", 12, "--temperature", 0)
    assert greedy.returncode == 0, greedy.stderr
    assert greedy.stdout == argmax_text(ckpts[kind], PROMPT, 12) + "\n" and greedy.stdout.startswith(PROMPT)
    # the same text again, from the export and straight from the checkpoint
    for src in (exp, ckpts[kind]):
        again = sample_in_process(capsys, "--checkpoint", src, "--prompt", PROMPT, "--max_new_tokens", 12, "--temperature", 0)
        assert again == greedy.stdout
    seeded = cli("sample.py", "--checkpoint", exp, "--prompt", PROMPT, "--max_new_tokens", 12, "--temperature", 0.9,
                 "--top_k", 40, "--seed", 7)
    assert seeded.returncode == 0 and len(seeded.stdout) > len(PROMPT) + 1  # it decoded some text
    assert sample_in_process(capsys, "--checkpoint", exp, "--prompt", PROMPT, "--max_new_tokens", 12, "--temperature", 0.9,
                             "--top_k", 40, "--seed", 7) == seeded.stdout  # same seed, same text


def test_sampling_library_top_k_and_padding(exports):
    """top_k=1 is greedy whatever the temperature; the padding rows of the vocabulary never come out."""
    from harness.sampling import generate, prompt_ids

    model, vocab, meta = load_model(exports["compact"])
    ids = prompt_ids(vocab, "import os\n")
    greedy = generate(model, ids, 8, temperature=0, n_real=vocab.n_real, context=meta["seq_len"])
    top1 = generate(model, ids, 8, temperature=5.0, top_k=1, seed=3, n_real=vocab.n_real, context=meta["seq_len"])
    assert greedy == top1
    hot = generate(model, ids, 48, temperature=50.0, seed=1, n_real=vocab.n_real, context=meta["seq_len"])
    assert all(0 <= t < vocab.n_real for t in hot) and vocab.n_real < model.shape.vocab_size


def test_bad_input_is_one_error_line(ckpts, exports, tmp_path):
    not_ckpt = tmp_path / "notes.txt"
    not_ckpt.write_text("hello\n")
    a_file = tmp_path / "file"
    a_file.write_text("")
    # a checkpoint of the speedrun model: refused in one line (here the tiny run's, relabelled)
    ckpt = torch.load(ckpts["full"], weights_only=True)
    ckpt["config"]["model"] = "speedrun"
    speedrun = tmp_path / "speedrun.pt"
    torch.save(ckpt, speedrun)
    cases = [
        (("export_weights.py", "--checkpoint", tmp_path / "none.pt", "--out", tmp_path / "o1"),
         f"error: {tmp_path / 'none.pt'}: no such checkpoint file"),
        (("export_weights.py", "--checkpoint", not_ckpt, "--out", tmp_path / "o2"),
         f"error: {not_ckpt}: cannot read checkpoint (truncated or corrupt?)"),
        (("export_weights.py", "--checkpoint", ckpts["full"], "--out", a_file),
         f"error: --out {a_file}: is a file, not a directory"),
        (("export_weights.py", "--checkpoint", ckpts["full"], "--out", a_file / "sub"),
         f"error: --out {a_file / 'sub'}: a path in it is a file"),
        (("export_weights.py", "--checkpoint", speedrun, "--out", tmp_path / "o3"),
         f"error: {speedrun}: a --model speedrun checkpoint (harness/speedrun_model.py); weight export and sampling"
         " support --model gpt (harness/model.py) only"),
        (("export_weights.py", "--checkpoint", ckpts["compact"], "--out", tmp_path / "o4", "--train_files", tmp_path / "gone_*.bin"),
         f"error: {ckpts['compact']}: no shards match"),
        (("sample.py", "--checkpoint", tmp_path / "none"), f"error: {tmp_path / 'none'}: no such checkpoint file or export directory"),
        (("sample.py", "--checkpoint", tmp_path), f"error: {tmp_path}: not a weight export (no config.json or model.safetensors"),
        (("sample.py", "--checkpoint", not_ckpt), f"error: {not_ckpt}: cannot read checkpoint"),
        (("sample.py", "--checkpoint", speedrun), f"error: {speedrun}: a --model speedrun checkpoint"),
        (("sample.py", "--checkpoint", ckpts["full"], "--temperature", "-1"), "error: --temperature -1.0: must be >= 0 (0 = greedy)"),
        (("sample.py", "--checkpoint", ckpts["full"], "--top_k", "0"), "error: --top_k 0: must be >= 1"),
    ]
    import export_weights
    import sample
    from base import UserError

    for i, (args, start) in enumerate(cases):
        if i in (0, 4, 9, 10):  # through the command line: one line on stderr, exit 2, no traceback
            r = cli(*args)
            lines = r.stderr.strip().splitlines()
            assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(start), (args, r.stderr)
        else:  # the same UserError in process (what run_cli prints as that line), quicker
            main = {"export_weights.py": export_weights.main, "sample.py": sample.main}[args[0]]
            with pytest.raises(UserError) as e:
                main([str(a) for a in args[1:]])
            assert f"error: {e.value}".startswith(start) and "\n" not in str(e.value), args
    assert not (tmp_path / "o1").exists()  # a missing checkpoint leaves no output directory behind
    # a prompt token the compact vocabulary lacks is named
    model, vocab, _ = load_model(exports["compact"])
    enc, have = gpt2_encoding(), set(vocab.token_ids.tolist())
    missing = next(t for t in range(50256) if t not in have and enc.encode_ordinary(enc.decode([t])) == [t])
    with pytest.raises(UserError, match=f"prompt token .* \\(GPT-2 id {missing}\\) is not in this model's compact vocabulary"):
        vocab.encode(gpt2_encoding().decode([missing]))
