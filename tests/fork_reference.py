"""The fork's own functions, taken from ../shared/reference/fork/*.py at test time (never copied).

`fork_defs(file, names, namespace)` parses a fork file and executes only the named top-level
definitions (functions, classes, assignments) in a namespace the test provides, where CUDA-only
pieces are the test's CPU stand-ins. torch.compile is an identity while they are defined (the
fork compiles its update kernels; on CPU the plain functions are what we compare). Where the
fork's code is absent (a user's clone, without ../shared), FORK_MISSING is the skip reason.
"""

from __future__ import annotations

import ast
import math
import types
from pathlib import Path
from typing import Any, Iterable

import torch

FORK = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "fork"
FORK_MISSING = None if (FORK / "train_gpt.py").is_file() else (
    "the fork's code (../shared/reference/fork, beside the repository) is not here: the parity tests"
    " against it run only where it is")


def _name_of(node: ast.stmt) -> str | None:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return node.name
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return node.target.id
    return None


def fork_tree(file: str) -> ast.Module:
    return ast.parse((FORK / file).read_text(encoding="utf-8"), filename=file)


def _identity_compile(fn=None, **_kwargs):
    return fn if callable(fn) else (lambda f: f)


def fork_defs(file: str, names: Iterable[str], namespace: dict[str, Any] | None = None,
              transform: ast.NodeTransformer | None = None) -> dict[str, Any]:
    """Execute the top-level definitions `names` of fork/`file` (in file order) in `namespace`."""
    wanted = set(names)
    tree = fork_tree(file)
    body = [node for node in tree.body if _name_of(node) in wanted]
    missing = wanted - {_name_of(n) for n in body}
    if missing:
        raise LookupError(f"{file}: no top-level {sorted(missing)}")
    module = ast.Module(body=body, type_ignores=[])
    if transform is not None:
        module = ast.fix_missing_locations(transform.visit(module))
    ns = {"torch": torch, "math": math, "Tensor": torch.Tensor, "nn": torch.nn, **(namespace or {})}
    real_compile = torch.compile
    torch.compile = _identity_compile
    try:
        exec(compile(module, str(FORK / file), "exec"), ns)
    finally:
        torch.compile = real_compile
    return ns


def fork_literal(file: str, class_name: str, method: str, attribute: str) -> Any:
    """The literal assigned to `self.attribute` (or a local name) in class_name.method of fork/file."""
    for node in fork_tree(file).body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for fn in node.body:
                if isinstance(fn, ast.FunctionDef) and fn.name == method:
                    for stmt in ast.walk(fn):
                        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
                            t = stmt.targets[0]
                            name = t.attr if isinstance(t, ast.Attribute) else getattr(t, "id", None)
                            if name == attribute:
                                return _literal(stmt.value)
    raise LookupError(f"{file}: no literal {class_name}.{method}: {attribute}")


def _literal(node: ast.expr) -> Any:
    """ast.literal_eval, plus dict(key=literal, ...) calls."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dict" and not node.args:
        return {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    return ast.literal_eval(node)


def fake_dist(world_size: int = 1, rank: int = 0) -> types.SimpleNamespace:
    """What the fork's optimizer asks of torch.distributed in a single process."""
    return types.SimpleNamespace(is_initialized=lambda: False, get_rank=lambda: rank,
                                 get_world_size=lambda: world_size)
