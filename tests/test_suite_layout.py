"""The suite's own layout, as tests: test modules live in the folder of the package they test
(or tests/e2e), helpers are plain modules of tests/support, and no module loads another as a
pytest plugin."""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
FOLDERS = ("shapcore", "service", "worker", "training", "e2e")
#: The checks of the repository as a whole, at the top.
TOP_LEVEL = {"test_code_shape.py", "test_deploy_config.py", "test_deploy_kubernetes.py", "test_suite_layout.py"}


def _python_files() -> list[Path]:
    return sorted(TESTS.rglob("*.py"))


def test_every_test_module_is_in_a_folder_of_the_layout():
    misplaced = []
    for path in TESTS.rglob("test_*.py"):
        rel = path.relative_to(TESTS)
        if rel.parts[0] not in FOLDERS and str(rel) not in TOP_LEVEL:
            misplaced.append(str(rel))
    assert not misplaced, f"test modules outside tests/{{{','.join(FOLDERS)}}}: {misplaced}"
    for folder in FOLDERS:
        assert (TESTS / folder / "conftest.py").is_file(), f"tests/{folder} has no conftest.py"
        assert (TESTS / folder / "__init__.py").is_file(), f"tests/{folder} is not a package"


def test_helpers_are_imported_not_loaded_as_plugins():
    """``pytest_plugins`` nowhere (the fixtures of tests/support are registered by tests/conftest.py),
    and no test module imports another test module (shared code goes to tests/support)."""
    offenders = []
    for path in _python_files():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytest_plugins" for t in node.targets):
                offenders.append(f"{path.relative_to(TESTS)}: pytest_plugins")
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[-1].startswith("test_"):
                offenders.append(f"{path.relative_to(TESTS)}: imports {node.module}")
    assert not offenders, offenders
    assert not list((TESTS / "support").glob("test_*.py")), "tests/support holds helpers only"


#: What only tests/support/redisdb.py (the declaration of the suite's Redis databases) may write:
#: a flush, the environment variables that name the databases, the shared server's address.
REDIS_OWNERSHIP = re.compile(r"\.flush(?:db|all)\(|SHAPSERVE_TEST_\w*REDIS|:6379\b")


def test_only_the_declared_redis_databases_are_flushed_or_named():
    """A test never touches data it does not own: the shared Redis is reached through the two
    databases tests/support/redisdb.py declares (flushed once per session, there); anything
    else runs on a private ``redis-server`` (tests/support/private_redis.py)."""
    declared = TESTS / "support" / "redisdb.py"
    offenders = [
        f"{path.relative_to(TESTS)}:{number}: {line.strip()}"
        for path in _python_files()
        if path not in (declared, Path(__file__).resolve())
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if REDIS_OWNERSHIP.search(line)
    ]
    assert not offenders, "Redis data named or flushed outside tests/support/redisdb.py:\n" + "\n".join(offenders)
