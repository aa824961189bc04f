"""One exception type for bad input: the entry points print its message as one line and exit 2."""


class UserError(Exception):
    """Bad input from the user (config, files, flags). The message is one line: what, where, what is allowed."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
