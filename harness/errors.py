"""One exception type for bad input: the entry points print its message as one line and exit 2."""

import os
import sys
from pathlib import Path
from typing import Callable, NoReturn


class UserError(Exception):
    """Bad input from the user (config, files, flags). The message is one line: what, where, what is allowed."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def run_cli(main: Callable[[], int], *, broken_pipe_ok: bool = False) -> NoReturn:
    """The `if __name__ == "__main__"` of a command: exit with main()'s code; a UserError is one
    `error:` line on stderr and exit 2; Ctrl-C exits 130 without a traceback."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:  # `command --format csv | head`
        if not broken_pipe_ok:
            raise
        code = 0
    sys.exit(code)


def dir_write_error(directory: Path) -> OSError | None:
    """Create `directory` if needed and write and remove a probe file in it: the OSError that
    stopped it, or None when the directory is writable (checked before any real output)."""
    probe = Path(directory) / f".write-test.{os.getpid()}"
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return e
    return None
