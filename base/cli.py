"""One flag style for every command: multi-word flags are spelled --snake_case, as the config
fields (`--log_dir`, `--max_new_tokens`), and that is what --help shows; the --kebab-case
spelling (`--log-dir`, `--log-dir=x`) is accepted too, silently, so older command lines work.

    from base.cli import ArgumentParser    # in place of argparse.ArgumentParser
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser that reads `--kebab-case` as the `--snake_case` flag it spells.
    Declaring a kebab-case flag is a programming error (ValueError when parsing)."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace=None):
        self._check_flag_style()
        argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self.snake_case_argv(argv), namespace)

    def snake_case_argv(self, argv: Sequence[str]) -> list[str]:
        """argv with each kebab-case spelling of a declared flag replaced by its snake_case one
        (up to a `--`, after which everything is positional)."""
        out: list[str] = []
        for i, arg in enumerate(argv):
            if arg == "--":
                return out + list(argv[i:])
            out.append(self._snake_case_flag(arg))
        return out

    def _snake_case_flag(self, arg: str) -> str:
        flag, eq, value = arg.partition("=")
        if not flag.startswith("--") or "-" not in flag[2:] or flag in self._option_string_actions:
            return arg
        snake = "--" + flag[2:].replace("-", "_")
        declared = self._option_string_actions
        if snake in declared or (self.allow_abbrev and any(o.startswith(snake) for o in declared)):
            return snake + eq + value
        return arg  # not ours: argparse reports it as it is

    def _check_flag_style(self) -> None:
        kebab = [o for o in self._option_string_actions if o.startswith("--") and "-" in o[2:]]
        if kebab:
            raise ValueError(f"{self.prog}: flag {kebab[0]} is kebab-case; declare it as "
                             f"--{kebab[0][2:].replace('-', '_')} (base/cli.py: one flag style)")
