"""Download FineWeb10B GPT-2 token shards (modded-nanogpt's copy on the Hugging Face hub).

    python data/cached_fineweb10B.py N [--dir data/fineweb10B]

Fetches ``fineweb_val_000000.bin`` and the first N train shards ``fineweb_train_000001.bin`` ..
``fineweb_train_{N:06d}.bin`` (100M tokens, ~200 MB each; N <= 103) from the dataset repo
``kjj0/fineweb10B-gpt2`` through huggingface_hub, which downloads to a temp file and resumes
an interrupted transfer. A shard already present and valid (header, version and size checked)
is skipped without a request; a present but damaged one is fetched again.
"""

from __future__ import annotations

from pathlib import Path

from base import UserError, dir_write_error, run_cli
from base.cli import ArgumentParser
from data.shards import read_header

REPO_ID = "kjj0/fineweb10B-gpt2"
MAX_TRAIN_SHARDS = 103
DEFAULT_DIR = Path("data/fineweb10B")
VAL_FILE = "fineweb_val_000000.bin"


def shard_names(num_train: int) -> list[str]:
    """The val shard, then train shards 1..num_train (the numbering starts at 1 upstream)."""
    if not isinstance(num_train, int) or isinstance(num_train, bool) or not 1 <= num_train <= MAX_TRAIN_SHARDS:
        raise UserError(f"number of train shards {num_train!r}: must be an integer in 1..{MAX_TRAIN_SHARDS}")
    return [VAL_FILE] + [f"fineweb_train_{i:06d}.bin" for i in range(1, num_train + 1)]


def _valid(path: Path) -> bool:
    try:
        read_header(path)
        return True
    except UserError:
        return False


def _check_writable(out_dir: Path, missing: list[str]) -> None:
    """--dir must be a directory we can write to (checked before any download, and only when
    something is missing: a complete read-only copy is fine)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--dir {out_dir}: is a file, not a directory")
    if not missing:
        return
    e = dir_write_error(out_dir)
    if e is not None:
        raise UserError(f"--dir {out_dir}: cannot write the {len(missing)} missing shard(s) there"
                        f" ({e.strerror or e}); pass --dir DIR with a writable directory") from None


def download_fineweb(
    num_train: int,
    out_dir: str | Path = DEFAULT_DIR,
    *,
    repo_id: str = REPO_ID,
    revision: str | None = None,
    endpoint: str | None = None,
    log=print,
) -> dict:
    """Make sure ``out_dir`` holds the val shard and train shards 1..num_train, all valid.

    Returns ``{"dir", "downloaded": [names], "present": [names]}``.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    names = shard_names(num_train)
    out_dir = Path(out_dir)
    _check_writable(out_dir, [n for n in names if not ((out_dir / n).exists() and _valid(out_dir / n))])
    downloaded, present = [], []
    for name in names:
        path = out_dir / name
        if path.exists() and _valid(path):
            present.append(name)
            continue
        damaged = path.exists()
        if damaged:
            log(f"{path}: present but not a valid shard; downloading it again")
            path.unlink()
        log(f"downloading {name} from {repo_id} ...")
        try:
            got = hf_hub_download(
                repo_id=repo_id,
                filename=name,
                repo_type="dataset",
                revision=revision,
                local_dir=out_dir,
                endpoint=endpoint,
                force_download=damaged,  # never trust local download metadata for a bad file
            )
        except (HfHubHTTPError, EntryNotFoundError, OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"cannot download {name} from hub dataset {repo_id}: {first} "
                "(check the network, HF_ENDPOINT and HF_HUB_OFFLINE; offline, use `python -m data.prepare_corpus`)"
            ) from None
        read_header(got)  # a server that sent something else: fail here, naming the file
        downloaded.append(name)
    return {"dir": str(out_dir), "downloaded": downloaded, "present": present}


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(
        prog="python data/cached_fineweb10B.py",
        description=f"Download the FineWeb10B val shard and the first N train shards (GPT-2 tokens) from {REPO_ID}.",
    )
    ap.add_argument("num_train", metavar="N", help=f"number of train shards, 1..{MAX_TRAIN_SHARDS} (100M tokens each)")
    ap.add_argument("--dir", default=str(DEFAULT_DIR), help="where the shards go (default: data/fineweb10B)")
    ap.add_argument("--revision", default=None, help="hub revision (branch, tag or commit; default main)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        n = int(args.num_train)
    except ValueError:
        raise UserError(f"number of train shards {args.num_train!r}: must be an integer in 1..{MAX_TRAIN_SHARDS}") from None
    result = download_fineweb(n, args.dir, revision=args.revision)
    print(
        f"{result['dir']}: {len(result['downloaded'])} shards downloaded, "
        f"{len(result['present'])} already present and valid "
        f"(train: {result['dir']}/fineweb_train_*.bin, val: {result['dir']}/{VAL_FILE})"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
