"""The ground floor: atomic_write (text, bytes, a writer function; a failed write keeps the old
file and leaves no temp file) and run_cli (exit codes, the one `error:` line)."""

import subprocess
import sys

import pytest

from base import EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError, atomic_write, temp_path_for


def test_atomic_write_text_bytes_and_writer(tmp_path):
    assert atomic_write(tmp_path / "a" / "t.txt", "héllo\n").read_text(encoding="utf-8") == "héllo\n"
    assert atomic_write(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    atomic_write(tmp_path / "c.txt", lambda tmp: tmp.write_text("from a writer"))
    assert (tmp_path / "c.txt").read_text() == "from a writer"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["b.bin", "c.txt", "t.txt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "doc.json"
    atomic_write(path, "old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["doc.json"]


def test_temp_names_are_hidden_unique_and_beside_the_target(tmp_path):
    a, b = temp_path_for(tmp_path / "x.bin"), temp_path_for(tmp_path / "x.bin")
    assert a != b and a.parent == tmp_path and a.name.startswith(".x.bin.") and a.name.endswith(".tmp")


def test_user_error_is_one_line():
    assert str(UserError("a\n  b\tc")) == "a b c"


@pytest.mark.parametrize("body, code, err", [
    ("return 0", 0, ""),
    ("return 3", 3, ""),
    ("raise UserError('--x 1: must be > 1')", EXIT_USER_ERROR, "error: --x 1: must be > 1\n"),
    ("raise KeyboardInterrupt", EXIT_INTERRUPTED, "interrupted\n"),
])
def test_run_cli_exit_codes_and_messages(body, code, err):
    script = ("from base import UserError, run_cli\n"
              f"def main():\n    {body}\n"
              "run_cli(main, interrupted_note='interrupted')\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (code, err)
