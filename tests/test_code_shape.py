"""The shape rules of the code base, as tests: small modules, short functions, and the
dependency rule between the rooms (service, worker, training on the shared ``shapcore``).

``make test`` runs ``lint-imports`` itself; the test here shows that its contracts would
catch a forbidden import (a rule that cannot fail protects nothing).
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shapcore", "service", "worker", "training")
CHECKED = (*PACKAGES, "scripts")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
#: A longer function says why in its docstring with this marker.
LONG_MARKER = "Long because"


def _sources() -> list[Path]:
    return sorted(p for folder in CHECKED for p in (ROOT / folder).rglob("*.py"))


def test_modules_are_small() -> None:
    too_long = {
        str(p.relative_to(ROOT)): n for p in _sources() if (n := p.read_text().count("\n")) > MAX_MODULE_LINES
    }
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines (split them): {too_long}"


def test_functions_are_short_or_say_why() -> None:
    too_long = {}
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES and LONG_MARKER not in (ast.get_docstring(node) or ""):
                too_long[f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"] = length
    assert not too_long, f"over {MAX_FUNCTION_LINES} lines without '{LONG_MARKER}' in the docstring: {too_long}"


def _lint_imports(tree: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.fail(f"lint-imports is not installed beside {sys.executable} (pip install import-linter)")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(exe), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The four packages and pyproject.toml, copied so that a test may break them."""
    dest = tmp_path_factory.mktemp("tree")
    for package in PACKAGES:
        shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_import_contracts_hold_on_the_tree(tree_copy: Path) -> None:
    run = _lint_imports(tree_copy)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("service/app.py", "import worker.runtime", "never import each other"),
        ("worker/jobs.py", "import service.app", "never import each other"),
        ("service/engine.py", "import training.train", "never import each other"),
        ("shapcore/registry.py", "import training.presets", "imports no room"),
        ("shapcore/jobs/queue.py", "import torch", "free of torch"),
        ("shapcore/explain/request.py", "import torch", "free of torch"),
        ("shapcore/explain/result.py", "import shapcore.jobs.queue", "know no queue"),
        ("shapcore/value.py", "import shapcore.jobs.settings", "know no queue"),
        ("shapcore/jobs/keys.py", "import shapcore.jobs.client", "No import cycles"),
        ("worker/segmentation.py", "import worker.explain", "No import cycles"),
        ("worker/methods/base.py", "import worker.methods.kernel", "No import cycles"),
        ("shapcore/shapley/estimator.py", "import scipy", "NumPy-only"),
    ],
)
def test_import_contracts_catch_a_forbidden_import(tree_copy: Path, module: str, line: str, contract: str) -> None:
    path = tree_copy / module
    original = path.read_text()
    path.write_text(original + f"\n{line}  # a forbidden import, added by the test\n")
    try:
        run = _lint_imports(tree_copy)
    finally:
        path.write_text(original)
    assert run.returncode != 0, f"lint-imports accepted {line!r} in {module}:\n{run.stdout}"
    broken = [ln for ln in run.stdout.splitlines() if ln.rstrip().endswith("BROKEN")]
    assert any(contract in ln for ln in broken), run.stdout
