"""The ground floor: what every other part of the project shares, importing nothing of ours.

    from base import UserError, run_cli, atomic_write, EXIT_USER_ERROR

cli.py         ArgumentParser (every command's: --snake_case flags, --kebab-case accepted too)
errors.py      UserError (bad input: one line naming what, where and what is allowed) and
               run_cli (a command's `if __name__ == "__main__"`: `error: ...` and exit 2)
exit_codes.py  the exit codes of the trainer, the launcher and the commands
files.py       atomic_write (temp file in the same directory, then os.replace) and
               dir_write_error (is a directory writable, checked before any real output) and
               check_out_dir (a command's --out: one error line if it cannot be written)
processes.py   pid_alive (is a process of this host still there: stale locks and runs)
"""

from base.errors import UserError, run_cli
from base.exit_codes import (
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_RUNS_FAILED,
    EXIT_USER_ERROR,
)
from base.files import atomic_write, check_out_dir, dir_write_error, temp_path_for

__all__ = [
    "UserError", "run_cli", "atomic_write", "check_out_dir", "dir_write_error", "temp_path_for",
    "EXIT_OK", "EXIT_RUNS_FAILED", "EXIT_USER_ERROR", "EXIT_DIVERGED", "EXIT_PREEMPTED", "EXIT_INTERRUPTED",
]
