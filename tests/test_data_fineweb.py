"""cached_fineweb10B against a real HTTP server on 127.0.0.1 speaking the hub's resolve protocol."""

import hashlib
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from base import UserError
from data.cached_fineweb10B import REPO_ID, download_fineweb, shard_names
from data.shards import HEADER_BYTES, read_header, write_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _HubHandler(BaseHTTPRequestHandler):
    """HEAD/GET {endpoint}/datasets/{repo}/resolve/{revision}/{filename}, as huggingface_hub requests
    them: the HEAD answers X-Repo-Commit, ETag and Content-Length; GET honours Range (resume)."""

    files: dict[str, bytes] = {}
    log: list[tuple[str, str]] = []

    def log_message(self, *args):
        pass

    def _resolve(self, send_body):
        self.log.append((self.command, self.path))
        prefix = f"/datasets/{REPO_ID}/resolve/"
        if not self.path.startswith(prefix):
            return self._error(404, "RepoNotFound", "Repository not found")
        revision, _, filename = self.path[len(prefix):].partition("/")
        if revision != "main" or filename not in self.files:
            return self._error(404, "EntryNotFound", f"{filename} does not exist on main")
        body = self.files[filename]
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and send_body and rng.startswith("bytes="):
            start, status = int(rng[6:].split("-")[0]), 206
        self.send_response(status)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", '"' + hashlib.sha256(body).hexdigest() + '"')
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        if send_body:
            self.wfile.write(body[start:])

    def _error(self, code, error_code, message):
        body = f'{{"error": "{message}"}}'.encode()
        self.send_response(code)
        self.send_header("X-Error-Code", error_code)
        self.send_header("X-Error-Message", message)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self):
        self._resolve(send_body=False)

    def do_GET(self):
        self._resolve(send_body=True)


@pytest.fixture
def hub(tmp_path):
    """A tiny kjj0/fineweb10B-gpt2 with val + 3 train shards, served on 127.0.0.1."""
    src = tmp_path / "hub_src"
    files = {}
    rng = np.random.default_rng(0)
    for name in shard_names(3):
        write_shard(src / name, rng.integers(0, 50257, size=int(rng.integers(500, 900))))
        files[name] = (src / name).read_bytes()
    handler = type("Handler", (_HubHandler,), {"files": files, "log": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", handler, files
    server.shutdown()
    server.server_close()


def _env(tmp_path, endpoint):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_PROGRESS_BARS="1",
               HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    return env


def _script(tmp_path, endpoint, *args):
    return subprocess.run(
        [sys.executable, "data/cached_fineweb10B.py", *map(str, args)],
        cwd=ROOT, env=_env(tmp_path, endpoint), capture_output=True, text=True, timeout=120,
    )


def test_script_downloads_then_skips_then_refetches_corrupt(tmp_path, hub):
    endpoint, handler, files = hub
    out = tmp_path / "fineweb10B"
    r = _script(tmp_path, endpoint, 2, "--dir", out)
    assert r.returncode == 0, r.stderr
    assert "3 shards downloaded, 0 already present" in r.stdout
    wanted = ["fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    for name in wanted:
        assert (out / name).read_bytes() == files[name]
    assert not (out / "fineweb_train_000003.bin").exists()
    assert [m for m, _ in handler.log] == ["HEAD", "GET"] * 3  # per file: metadata HEAD, then GET
    gets = sorted(p.rsplit("/", 1)[1] for m, p in handler.log if m == "GET")
    assert gets == sorted(wanted)
    assert all(p.startswith(f"/datasets/{REPO_ID}/resolve/main/") for _, p in handler.log)

    handler.log.clear()
    r = _script(tmp_path, endpoint, 2, "--dir", out)
    assert r.returncode == 0, r.stderr
    assert "0 shards downloaded, 3 already present and valid" in r.stdout
    assert handler.log == []  # nothing requested at all

    # a truncated shard (valid-looking header, short body) is fetched again
    damaged = out / "fineweb_train_000002.bin"
    damaged.write_bytes(files["fineweb_train_000002.bin"][: HEADER_BYTES + 10])
    r = _script(tmp_path, endpoint, 2, "--dir", out)
    assert r.returncode == 0, r.stderr
    assert "present but not a valid shard" in r.stdout and "1 shards downloaded, 2 already present" in r.stdout
    assert damaged.read_bytes() == files["fineweb_train_000002.bin"]
    assert [p.rsplit("/", 1)[1] for m, p in handler.log if m == "GET"] == ["fineweb_train_000002.bin"]


def test_in_process_api_corrupt_magic_and_more_shards(tmp_path, hub, monkeypatch):
    endpoint, handler, files = hub
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    out = tmp_path / "fw"
    r = download_fineweb(1, out, endpoint=endpoint, log=lambda *_: None)
    assert r["downloaded"] == ["fineweb_val_000000.bin", "fineweb_train_000001.bin"]
    val = out / "fineweb_val_000000.bin"
    data = bytearray(val.read_bytes())
    data[0] ^= 0xFF  # bad magic: re-fetched even though hub's local metadata says up to date
    val.write_bytes(bytes(data))
    r = download_fineweb(3, out, endpoint=endpoint, log=lambda *_: None)
    assert r["downloaded"] == ["fineweb_val_000000.bin", "fineweb_train_000002.bin", "fineweb_train_000003.bin"]
    assert r["present"] == ["fineweb_train_000001.bin"]
    assert val.read_bytes() == files["fineweb_val_000000.bin"]
    assert read_header(out / "fineweb_train_000003.bin") == (len(files["fineweb_train_000003.bin"]) - HEADER_BYTES) // 2


def test_missing_remote_file_is_user_error(tmp_path, hub):
    endpoint, handler, files = hub
    del handler.files["fineweb_train_000002.bin"]
    r = _script(tmp_path, endpoint, 2, "--dir", tmp_path / "fw")
    assert r.returncode == 2
    assert r.stderr.startswith("error: cannot download fineweb_train_000002.bin from hub dataset kjj0/fineweb10B-gpt2")
    assert r.stderr.count("\n") == 1


@pytest.mark.parametrize("n", ["0", "104", "two"])
def test_bad_count(tmp_path, n):
    r = subprocess.run([sys.executable, "data/cached_fineweb10B.py", n, "--dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60, env=_env(tmp_path, "http://127.0.0.1:9"))
    assert r.returncode == 2 and "must be an integer in 1..103" in r.stderr
    with pytest.raises(UserError, match="1..103"):
        shard_names(104)
