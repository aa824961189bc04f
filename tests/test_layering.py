"""The floors of the house (DESIGN.md, "Layering"), read off every .py file's imports with ast.

    base/                ground floor: imports nothing of ours
    data/, kernels/      on base only (never harness/, experiments/, bench/ or a command)
    harness/             on data/, kernels/, base/
    commands             the top-level scripts, on harness/
    experiments/, bench/ on top: libraries only, never a command-line script

and no import cycle between the top-level folders (a lazy import inside a function counts).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", ".git", "__pycache__", "logs", "reports", "checkpoints", ".pytest_cache"}
FOLDERS = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and p.name not in SKIP_DIRS and any(p.glob("*.py")))
SCRIPTS = sorted(p.stem for p in ROOT.glob("*.py"))  # train_gpt, launch_lr_sweep, monitor_runs, plot_loss, ...
LIBRARIES = ("base", "data", "kernels", "harness", "experiments", "bench")


def _unit_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else f"{rel.stem}.py"


def _imported_units(path: Path) -> set[str]:
    """The project units (a top-level folder, or `script.py`) that `path` imports anywhere in it."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside its own package
                names.add(_unit_of(path))
            elif node.module:
                names.add(node.module.split(".")[0])
    units = set()
    for n in names:
        if n in FOLDERS or n.endswith(".py"):
            units.add(n)
        elif n in SCRIPTS:
            units.add(f"{n}.py")
    return units


def _python_files() -> list[Path]:
    out = []
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT)
        if not SKIP_DIRS.intersection(rel.parts) and not any(part.startswith(".") for part in rel.parts[:-1]):
            out.append(p)
    return sorted(out)


FILES = _python_files()
IMPORTS = {p: _imported_units(p) for p in FILES}


def _violations(folders: tuple[str, ...], forbidden) -> list[str]:
    bad = []
    for p, units in IMPORTS.items():
        if _unit_of(p) in folders:
            bad += [f"{p.relative_to(ROOT)} imports {u}" for u in sorted(units) if forbidden(u)]
    return bad


def test_the_parser_sees_the_known_imports():
    """Guards the rules below against passing on an empty graph."""
    assert {"base", "data", "kernels", "harness", "experiments", "bench"} <= set(FOLDERS)
    assert {"train_gpt", "launch_lr_sweep", "monitor_runs", "plot_loss", "train_gpt_muon_new"} <= set(SCRIPTS)
    assert {"harness", "base"} <= IMPORTS[ROOT / "train_gpt.py"] | IMPORTS[ROOT / "harness" / "trainer.py"]
    assert {"data", "kernels", "base"} <= set().union(*(IMPORTS[p] for p in FILES if _unit_of(p) == "harness"))


def test_ground_floor_imports_nothing_of_the_project():
    assert _violations(("base",), lambda u: u != "base") == []


def test_data_and_kernels_stand_on_the_ground_floor_only():
    assert _violations(("data", "kernels"), lambda u: u not in ("base", "data", "kernels")) == []


def test_libraries_never_import_a_command_line_script():
    """experiments/ and bench/ (and every library below them) call libraries, never the commands."""
    assert _violations(LIBRARIES, lambda u: u.endswith(".py")) == []


def test_no_import_cycle_between_top_level_folders():
    graph: dict[str, set[str]] = {}
    for p, units in IMPORTS.items():
        graph.setdefault(_unit_of(p), set()).update(u for u in units if u != _unit_of(p))
    # Tarjan's strongly connected components: a component of more than one unit is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_orthogonalization_modules_do_not_import_each_other():
    ns, tk = ROOT / "kernels" / "newton_schulz.py", ROOT / "kernels" / "triton_kernels.py"

    def imports_of(path: Path) -> set[str]:
        mods = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                mods.add(node.module)
                mods.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                mods.update(a.name for a in node.names)
        return mods

    assert not ("kernels.newton_schulz" in imports_of(tk) and "kernels.triton_kernels" in imports_of(ns))
    assert "kernels.newton_schulz" not in imports_of(tk)  # triton_kernels is the lower one
