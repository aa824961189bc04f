"""Issue 19, the data commands: `python -m data.prepare_corpus` and `data/cached_fineweb10B.py`
given an --out/--dir that is a file, read-only or out of space, or run twice at once. One
`error:` line and exit 2, and a corpus directory is only ever replaced as a whole."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


from data.shards import read_header
from fault_mounts import fill, read_only_dir, small_tmpfs

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def prepare(out: Path, *extra: str, wait: bool = True):
    cmd = [PY, "-m", "data.prepare_corpus", "--out", str(out), "--no_progress", "--max_files", "40", *extra]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def one_error(r, *needles: str) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-3000:])
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def complete(d: Path) -> dict:
    """The corpus in d is whole: meta.json lists exactly the shards there, each valid."""
    meta = json.loads((d / "meta.json").read_text())
    listed = {s["file"]: s["tokens"] for s in meta["train_shards"] + meta["val_shards"]}
    assert set(listed) == {p.name for p in d.glob("*.bin")}
    for name, n in listed.items():
        assert read_header(d / name) == n
    return meta


def test_out_is_a_file(tmp_path):
    f = tmp_path / "corpus"
    f.write_text("mine\n")
    one_error(prepare(f), str(f), "is a file, not a directory")
    assert f.read_text() == "mine\n"


def test_out_read_only(tmp_path):
    with read_only_dir(tmp_path / "ro"):
        one_error(prepare(tmp_path / "ro" / "local"), "Read-only file system")


def test_workers_0_is_refused(tmp_path):
    one_error(prepare(tmp_path / "local", "--workers", "0"), "--workers 0", "must be >= 1")
    assert not (tmp_path / "local").exists()


def test_disk_full_keeps_the_old_corpus_whole(tmp_path):
    with small_tmpfs(tmp_path / "mnt", "32m") as mnt:
        out = mnt / "local"
        r = prepare(out, "--max_files", "20")
        assert r.returncode == 0, r.stderr
        before = snapshot(out)
        complete(out)
        fill(mnt)
        r = prepare(out, "--max_files", "300")  # another corpus: a rebuild, which runs out of space
        one_error(r, str(out), "No space left on device", "is left as it was")
        assert snapshot(out) == before  # no new train shard beside the old val shard
        assert sorted(p.name for p in mnt.iterdir()) == [".local.lock", "filler", "local"]  # no build left over


def test_two_runs_into_one_directory_take_turns(tmp_path):
    out = tmp_path / "local"
    a = prepare(out, "--max_files", "60", wait=False)
    b = prepare(out, "--max_files", "30", wait=False)
    ra, rb = a.communicate(timeout=300), b.communicate(timeout=300)
    assert a.returncode == 0 and b.returncode == 0, (ra, rb)
    meta = complete(out)  # whichever ran last, its corpus is there whole
    assert meta["max_files"] in (60, 30)
    r = prepare(out, "--max_files", str(meta["max_files"]))
    assert "up to date" in r.stdout


def test_a_build_waits_for_the_lock_of_another(tmp_path):
    import fcntl
    import os
    import time

    out = tmp_path / "local"
    fd = os.open(tmp_path / ".local.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a build in progress holds it
    err = tmp_path / "err.txt"
    with open(err, "w") as e:
        p = subprocess.Popen([PY, "-m", "data.prepare_corpus", "--out", str(out), "--no_progress", "--max_files", "20"],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=e)
    try:
        deadline = time.monotonic() + 120
        while "waiting for another prepare_corpus" not in err.read_text():
            assert p.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.1)
        assert p.poll() is None and not out.exists()  # nothing written while the other holds it
    finally:
        os.close(fd)  # the other build ends
    assert p.wait(timeout=300) == 0, err.read_text()
    complete(out)


def test_an_old_build_with_a_foreign_file_is_not_replaced(tmp_path):
    out = tmp_path / "local"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    one_error(prepare(out), "notes.md", "replaced as a whole")
    assert (out / "notes.md").read_text() == "mine"


def test_fineweb_dir_read_only(tmp_path):
    with read_only_dir(tmp_path / "fw") as d:
        r = subprocess.run([PY, "data/cached_fineweb10B.py", "1", "--dir", str(d)], cwd=ROOT, capture_output=True,
                           text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    one_error(r, f"--dir {d}", "Read-only file system")


def test_fineweb_dir_is_a_file(tmp_path):
    f = tmp_path / "fw"
    f.write_text("x")
    r = subprocess.run([PY, "data/cached_fineweb10B.py", "1", "--dir", str(f)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    one_error(r, "is a file, not a directory")
