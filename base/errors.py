"""One exception type for bad input: the entry points print its message as one line and exit 2."""

import sys
from typing import Callable, NoReturn

from base.exit_codes import EXIT_INTERRUPTED, EXIT_OK, EXIT_USER_ERROR


class UserError(Exception):
    """Bad input from the user (config, files, flags). The message is one line: what, where, what is allowed."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def run_cli(main: Callable[[], int], *, broken_pipe_ok: bool = False, interrupted_note: str | None = None) -> NoReturn:
    """The `if __name__ == "__main__"` of a command: exit with main()'s code; a UserError is one
    `error:` line on stderr and exit 2; Ctrl-C exits 130 without a traceback (after printing
    `interrupted_note` on stderr, when given)."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_USER_ERROR
    except KeyboardInterrupt:
        if interrupted_note:
            print(interrupted_note, file=sys.stderr)
        code = EXIT_INTERRUPTED
    except BrokenPipeError:  # `command --format csv | head`
        if not broken_pipe_ok:
            raise
        code = EXIT_OK
    sys.exit(code)
