"""The queued explanation methods, one module each, run by name through the registry.

:data:`shapcore.explain.methods.METHODS` declares each method once (its properties and its
``entry``, ``worker.methods.<module>:attribute``); :func:`run_method` imports the entry and
calls it with a :class:`~worker.methods.base.MethodContext`. Adding a method: a module here
with ``attribute(ctx) -> Attribution`` and an entry in the registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from shapcore.explain.methods import get_method
from worker.methods.base import Attribution, MethodContext

__all__ = ["Attribution", "MethodContext", "resolve", "run_method"]


def resolve(name: str) -> Callable[[MethodContext], Attribution]:
    """The function computing the queued method ``name`` (ValueError for an inline or unknown one)."""
    method = get_method(name)
    if method.inline:
        raise ValueError(f"method {name!r} is answered by the API in the request, not by a worker")
    module, _, function = method.entry.partition(":")
    return getattr(importlib.import_module(module), function)


def run_method(name: str, ctx: MethodContext) -> Attribution:
    return resolve(name)(ctx)
