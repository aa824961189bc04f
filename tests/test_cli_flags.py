"""One flag style across the commands (base/cli.py): every multi-word flag of every command is
spelled --snake_case in its --help, and its --kebab-case spelling (`--a-b V`, `--a-b=V`) parses
to the same result, so older command lines keep working. Every parser in the project is base's."""

import re
import subprocess
import sys

import pytest

import export_weights
import monitor_runs
import plot_loss
import sample
from base.cli import ArgumentParser
from harness import config
from harness.sweep import cli as sweep_cli
from train_utils import ROOT


def _study(name):
    def build():
        import importlib

        from experiments import common

        module = importlib.import_module(f"experiments.{name}")
        return common.build_parser(module.__doc__.splitlines()[0], module._args)
    return build


def _module_parser(name):
    def build():
        import importlib

        return importlib.import_module(name).build_parser()
    return build


# command -> (its parser, the arguments it requires)
COMMANDS = {
    "train_gpt.py": (lambda: config.build_parser("train_gpt.py"), []),
    "train_gpt_muon_new.py": (lambda: config.build_parser("train_gpt_muon_new.py"), []),
    "launch_lr_sweep.py": (sweep_cli.build_parser, []),
    "monitor_runs.py": (monitor_runs.build_parser, []),
    "plot_loss.py": (plot_loss.build_parser, []),
    "export_weights.py": (export_weights.build_parser, ["--checkpoint", "c.pt", "--out", "o"]),
    "sample.py": (sample.build_parser, ["--checkpoint", "c.pt"]),
    "data/prepare_corpus.py": (_module_parser("data.prepare_corpus"), []),
    "data/cached_fineweb10B.py": (_module_parser("data.cached_fineweb10B"), ["1"]),
    "experiments/report.py": (_module_parser("experiments.report"), []),
    **{f"experiments/{name}.py": (_study(name), ["--out", "o"]) for name in (
        "digits_comparison", "gradient_rank", "gradient_snr", "ns_analysis", "rank_manipulation",
        "weight_update_dynamics")},
    **{f"bench/{name}.py": (_module_parser(f"bench.{name}"), []) for name in (
        "checkpoint", "diag_overhead", "gpu_check", "loader", "monitor_refresh", "ns_kernels", "ns_study",
        "optimizer", "ord_overhead", "tokenizer", "train_throughput", "time_to_loss", "adam_shard", "head_loss")},
}
KEBAB = re.compile(r"(?<![\w#-])--[a-z0-9]+(?:-[a-z0-9]+)+")


def _multi_word_flags(parser):
    return [(opt, action) for action in parser._actions for opt in action.option_strings if "_" in opt[2:]]


def _value(action) -> list[str]:
    if action.nargs == 0:
        return []
    return [str(action.choices[-1]) if action.choices else "7"]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_both_spellings_parse_alike_and_help_shows_snake_case(command):
    build, required = COMMANDS[command]
    parser = build()
    assert isinstance(parser, ArgumentParser)
    default = vars(parser.parse_args(required))
    for flag, action in _multi_word_flags(parser):
        kebab = flag.replace("_", "-")
        value = _value(action)
        snake = vars(parser.parse_args([*required, flag, *value]))
        assert snake != default, f"{command} {flag}: the flag changed nothing"
        assert vars(parser.parse_args([*required, kebab, *value])) == snake, f"{command} {kebab}"
        if value:
            assert vars(parser.parse_args([*required, f"{kebab}={value[0]}"])) == snake, f"{command} {kebab}="
    text = parser.format_help()
    shown = [flag for flag, action in _multi_word_flags(parser) if action.help != "==SUPPRESS=="]
    assert all(flag in text for flag in shown)
    assert KEBAB.findall(text) == [], f"{command} --help shows kebab-case flags"


def test_every_command_in_the_table_and_every_parser_is_bases():
    """A new command (a file that builds an ArgumentParser) must use base.cli and join COMMANDS."""
    builds = set()
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith((".", "tests/")) or "/." in rel or "site-packages" in rel:
            continue
        text = path.read_text(encoding="utf-8")
        assert "argparse.ArgumentParser(" not in text, f"{rel}: use base.cli.ArgumentParser"
        if re.search(r"\bArgumentParser\(", text) and rel != "base/cli.py":
            builds.add(rel)
    in_table = {c for c in COMMANDS if not c.startswith("experiments/") or c == "experiments/report.py"}
    in_table |= {"experiments/common.py", "harness/config.py", "harness/sweep/cli.py"}
    assert builds <= in_table | {"train_gpt.py"}, builds - in_table


def test_trainer_config_from_kebab_flags_is_the_same():
    snake = config.load_config(["--muon_lr", "0.03", "--spectral_lr_mul", "0.5", "--cautious_wd"], env={},
                               overrides={"ord": True})
    kebab = config.load_config(["--muon-lr", "0.03", "--spectral-lr-mul=0.5", "--cautious-wd"], env={},
                               overrides={"ord": True})
    assert kebab == snake and snake.spectral_lr_mul == 0.5 and snake.muon_lr == 0.03


def test_parser_rules():
    p = ArgumentParser(prog="t")
    p.add_argument("--stale_min", type=float)
    p.add_argument("--text")
    p.add_argument("rest", nargs="*")
    assert p.parse_args(["--stale-m", "5"]).stale_min == 5  # abbreviations as argparse's
    args = p.parse_args(["--text=--stale-min", "--", "--stale-min"])  # values and after `--` stay
    assert args.text == "--stale-min" and args.rest == ["--stale-min"]
    with pytest.raises(SystemExit):
        p.parse_args(["--other-flag", "1"])  # not declared: argparse's error, as written
    bad = ArgumentParser(prog="t")
    bad.add_argument("--max-runs")
    with pytest.raises(ValueError, match="--max_runs"):
        bad.parse_args([])


def test_old_kebab_command_lines_still_run(tmp_path):
    logs = tmp_path / "logs"
    r = subprocess.run([sys.executable, str(ROOT / "launch_lr_sweep.py"), "sweeps/tiny_ord.toml", "--dry-run",
                        "--log-dir", str(logs), "--max-runs=50"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "train_gpt_muon_new.py" in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "monitor_runs.py"), str(tmp_path), "--once", "--format", "json",
                        "--stale-min", "5", "--stale-factor=2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert '"runs": []' in r.stdout
