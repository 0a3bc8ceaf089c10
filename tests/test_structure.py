"""The package's shape: one job per module, kept small (issue 21's redesign step).

No module of kvmtrace/ over 420 lines and no function over 100 (the goal is about 400
and 80); no import inside a function body (every dependency shows at the top); no
module-level statement that does work at import time (only definitions, constants and
imports)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kvmtrace"
MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def test_there_are_modules_to_check():
    assert len(MODULES) >= 40


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_stay_small(path):
    src = path.read_text()
    assert len(src.splitlines()) <= 420, f"{path.name}: {len(src.splitlines())} lines"
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            n = node.end_lineno - node.lineno + 1
            assert n <= 100, f"{path.name}: {node.name} is {n} lines"


# Imports inside a function where a module is heavy or optional at run time: bcc and
# kvmtrace.loader (only the loader child and doctor load BPF: the exporter never maps
# libbcc), prometheus_client's registry in serve's app, PyYAML and bcrypt (only with a
# --web.config.file).
LAZY_IMPORTS_ALLOWED = {"bcc", "prometheus_client", "kvmtrace.collector", "kvmtrace.loader",
                        "yaml", "bcrypt"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_hidden_imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import | ast.ImportFrom):
                    names = [a.name for a in inner.names] if isinstance(inner, ast.Import) \
                        else [f"{inner.module}.{a.name}" if inner.module == "kvmtrace"
                              else inner.module or "" for a in inner.names]
                    assert all(n.split(".")[0] in LAZY_IMPORTS_ALLOWED or n
                               in LAZY_IMPORTS_ALLOWED for n in names), \
                        f"{path.name}: {node.name} imports {names}"
