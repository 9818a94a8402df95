"""Settings helpers shared by every room's pydantic-settings classes."""

from __future__ import annotations

from pydantic import BeforeValidator


def _blank_is_none(value: object) -> object:
    return None if isinstance(value, str) and not value.strip() else value


#: An optional setting that an empty variable (``MODEL_VERSION=``, as compose passes one) unsets.
BlankIsNone = BeforeValidator(_blank_is_none)
