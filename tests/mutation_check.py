"""Mutation check: does the suite see the bugs its tests are named after?

Each mutation is a one-line text substitution in one file. For each, the repository (tracked
and untracked, non-ignored files, plus data/local when present) is copied to a scratch
directory, the substitution is applied there (never in the working tree), the targeted tests
run in that copy, and the mutation is reported `caught` (the tests failed) or `survived`.

    python tests/mutation_check.py                 # every mutation
    python tests/mutation_check.py resume monitor  # the ones whose name contains a word
    python tests/mutation_check.py --baseline      # first check the targeted tests pass unmutated
    python tests/mutation_check.py --list
    python tests/mutation_check.py --before 410e381  # the same, against that commit's tests/
                                                   # (the targeted files that exist there, whole)

Exit code: 0 when every mutation run was caught, 1 when one survived, 2 on a usage error
(unknown name, or a substitution that no longer matches exactly once).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str  # must occur exactly once in `file`
    new: str
    tests: tuple[str, ...]  # pytest node ids (relative to the repository root)
    why: str = ""
    cuda_only: bool = False  # the catching test needs CUDA (skipped here: reported, not run)


M = Mutation
MUTATIONS: list[Mutation] = [
    # --- resume ---------------------------------------------------------------------------
    M("resume/train_time_reset", "harness/trainer.py",
      "self.state = RunState(**saved)", 'self.state = RunState(**{**saved, "train_time_ms": 0.0})',
      ("tests/test_resume_state.py",), "train_time_ms restarts from 0 on resume"),
]


def copy_repo(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if not src.is_file():
            continue  # deleted in the working tree but still tracked
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out)
    local = ROOT / "data" / "local"
    if local.is_dir():  # the default shards: the session fixture rebuilds them otherwise
        shutil.copytree(local, dst / "data" / "local")


def use_tests_of(root: Path, rev: str) -> None:
    """Replace tests/ in the scratch copy with the tests/ of commit `rev`."""
    shutil.rmtree(root / "tests")
    tar = subprocess.run(["git", "archive", rev, "tests"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=tar, check=True)


def tests_before(root: Path, tests: tuple[str, ...]) -> tuple[str, ...]:
    """The targeted test files that exist in the (old) tests/ of the copy, whole."""
    files = dict.fromkeys(t.split("::")[0] for t in tests)
    return tuple(f for f in files if (root / f).is_file())


def apply(root: Path, m: Mutation) -> None:
    path = root / m.file
    text = path.read_text()
    n = text.count(m.old)
    if n != 1:
        raise SystemExit(f"error: mutation {m.name}: {m.old!r} occurs {n} times in {m.file} (needs exactly 1)")
    path.write_text(text.replace(m.old, m.new))


def run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PYTHONPATH")}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timed out"
    tail = [l for l in p.stdout.splitlines() if l.strip()][-1:] or [""]
    return p.returncode, tail[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="run the mutations whose name contains one of these")
    ap.add_argument("--baseline", action="store_true", help="run each targeted test set unmutated first")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--before", metavar="REV", help="run against the tests/ of commit REV instead")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.names or any(n in m.name for n in args.names)]
    if not chosen:
        print(f"error: no mutation matches {args.names}", file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(f"{m.name:40s} {m.file}: {m.why}")
        return 0
    survived = 0
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        clean = Path(tmp) / "clean"
        copy_repo(clean)
        if args.before:
            use_tests_of(clean, args.before)
        targets = {m.name: tests_before(clean, m.tests) if args.before else m.tests for m in chosen}
        if args.baseline:
            for tests in dict.fromkeys(targets[m.name] for m in chosen if not m.cuda_only and targets[m.name]):
                rc, tail = run_tests(clean, tests, args.timeout)
                print(f"baseline {'ok' if rc == 0 else 'FAILS'}: {' '.join(tests)} ({tail})", flush=True)
                if rc != 0:
                    return 1
        for m in chosen:
            if m.cuda_only:
                print(f"{m.name:40s} not run (needs CUDA): {' '.join(m.tests)}", flush=True)
                continue
            tests = targets[m.name]
            if not tests:
                print(f"{m.name:40s} no test  (none of {' '.join(m.tests)} exists there)", flush=True)
                survived += 1
                continue
            work = Path(tmp) / "m"
            shutil.copytree(clean, work, symlinks=True)
            apply(work, m)
            t0 = time.monotonic()
            rc, tail = run_tests(work, tests, args.timeout)
            shutil.rmtree(work)
            # 5: no test collected (counts as survived); -1: timed out (a hang: caught, but look)
            verdict = {0: "SURVIVED", 5: "SURVIVED", -1: "timeout"}.get(rc, "caught")
            survived += verdict == "SURVIVED"
            print(f"{m.name:40s} {verdict:8s} {time.monotonic() - t0:5.0f}s  {' '.join(tests)}  [{tail}]",
                  flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
