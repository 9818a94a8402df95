"""End to end: real ``python -m service`` (uvicorn) and ``python -m worker`` (RQ) processes on a
real Redis, driven over HTTP (the fixtures that start them are registered by tests/conftest.py,
from tests/support). Every test here carries the ``e2e`` mark: ``pytest -m "not e2e" tests`` runs
the in-process suites alone, in a few minutes."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.e2e)
