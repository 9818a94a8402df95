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


# -- configuration is read from the environment by the settings modules only --------------------------

#: Where the environment may be read: the pydantic-settings families (shapcore/settings.py and
#: its heirs) and the scripts' and bench's own settings modules.
SETTINGS_MODULE = "settings.py"
#: Folders whose code must read its configuration through a settings module (tests/ may set and read freely).
ENV_CHECKED = (*CHECKED, "bench")


def environment_reads(source: str) -> list[str]:
    """``line: code`` of every read of the environment in ``source``: ``os.environ.get(...)``,
    ``os.environ[...]`` as a value, ``os.getenv(...)``, ``... in os.environ`` (also through
    ``from os import environ, getenv``). Passing the environment on to a child process
    (``{**os.environ, ...}``, ``os.environ.copy()``) or setting a variable is no read."""
    tree = ast.parse(source)
    environ_names, getenv_names = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "os":
            environ_names |= {a.asname or a.name for a in node.names if a.name == "environ"}
            getenv_names |= {a.asname or a.name for a in node.names if a.name == "getenv"}

    def is_environ(node: ast.AST) -> bool:
        if isinstance(node, ast.Attribute):
            return node.attr == "environ" and isinstance(node.value, ast.Name) and node.value.id == "os"
        return isinstance(node, ast.Name) and node.id in environ_names

    def is_getenv(node: ast.AST) -> bool:
        if isinstance(node, ast.Attribute):
            return node.attr == "getenv" and isinstance(node.value, ast.Name) and node.value.id == "os"
        return isinstance(node, ast.Name) and node.id in getenv_names

    reads = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            read = is_getenv(node.func) or (
                isinstance(node.func, ast.Attribute) and node.func.attr == "get" and is_environ(node.func.value)
            )
        elif isinstance(node, ast.Subscript):
            read = isinstance(node.ctx, ast.Load) and is_environ(node.value)
        elif isinstance(node, ast.Compare):
            read = any(isinstance(op, ast.In | ast.NotIn) for op in node.ops) and any(map(is_environ, node.comparators))
        else:
            read = False
        if read:
            reads.append(f"{node.lineno}: {ast.unparse(node)}")
    return reads


def environment_reads_outside_settings(root: Path) -> dict[str, list[str]]:
    """Every read of the environment under ``root``'s checked folders outside a settings module."""
    found = {}
    for path in sorted(p for folder in ENV_CHECKED for p in (root / folder).rglob("*.py")):
        if path.name != SETTINGS_MODULE and (reads := environment_reads(path.read_text())):
            found[str(path.relative_to(root))] = reads
    return found


def test_configuration_is_read_by_the_settings_modules_only() -> None:
    found = environment_reads_outside_settings(ROOT)
    assert not found, f"environment read outside a {SETTINGS_MODULE} (declare the variable in one): {found}"


@pytest.mark.parametrize(
    "source",
    [
        "import os\nx = os.environ.get('MODEL_REGISTRY', 'models')",
        "import os\nx = int(os.environ['WORLD_SIZE'])",
        "import os\nx = os.getenv('RANK')",
        "import os\nx = 'CUDA' in os.environ",
        "import os\nx = 'CUDA' not in os.environ",
        "from os import environ\nx = environ.get('DATA')",
        "from os import getenv as g\nx = g('DATA')",
    ],
)
def test_an_environment_read_is_found(source: str) -> None:
    assert environment_reads(source), source


def test_passing_or_setting_the_environment_is_no_read() -> None:
    source = (
        "import os, subprocess\n"
        "env = {**os.environ, 'REDIS_URL': 'redis://x'}\n"
        "subprocess.run(['true'], env=os.environ.copy())\n"
        "os.environ['OMP_WAIT_POLICY'] = 'PASSIVE'\n"
        "os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')\n"
        "del os.environ['X']\n"
        "settings = {}.get('X')\n"
    )
    assert environment_reads(source) == []


def test_a_read_planted_in_a_copy_of_the_tree_is_caught(tmp_path: Path) -> None:
    """The whole check, on copies of the checked folders with one read added to a module and one
    to a settings module: the first is reported, the second is not."""
    for folder in ENV_CHECKED:
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    assert environment_reads_outside_settings(tmp_path) == {}
    planted = tmp_path / "training" / "distributed.py"
    planted.write_text(planted.read_text() + "\n\nLOCAL = os.environ.get('LOCAL_RANK', '0')  # planted\n")
    allowed = tmp_path / "training" / "settings.py"
    allowed.write_text(allowed.read_text() + "\n\nimport os\n\nLOCAL = os.environ.get('LOCAL_RANK', '0')\n")
    found = environment_reads_outside_settings(tmp_path)
    assert list(found) == ["training/distributed.py"], found
    assert "os.environ.get('LOCAL_RANK', '0')" in found["training/distributed.py"][0]
