"""What the routes share, as FastAPI dependencies (``Annotated`` aliases for route signatures).

Everything here is built once per app by :func:`service.app.create_app` and its lifespan and
kept on ``app.state``: the routes hold no module-level state and read no environment::

    async def route(state: StateDep, settings: ExplainSettingsDep, explanations: ExplanationsDep) -> ...
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.explanations import Explanations
from service.settings import Settings
from service.state import ServiceState
from shapcore.jobs.client import ExplainClient
from shapcore.jobs.settings import ExplainSettings


def get_settings(request: Request) -> Settings:
    """The service's settings, as ``create_app`` was given them."""
    return request.app.state.settings


def get_state(request: Request) -> ServiceState:
    """Engine, batcher and decode threads, built by the lifespan."""
    return request.app.state.service


def get_explain_settings(request: Request) -> ExplainSettings:
    """EXPLAIN_* settings, with the connection, registry and limits of the service's own settings."""
    return request.app.state.explain_settings


def get_explanations(request: Request) -> Explanations:
    """The explanation service over the one queue client (:mod:`service.explanations`), on the
    app's Redis client (short timeouts: see ``shapcore.jobs.client.connect``)."""
    app = request.app.state
    return Explanations(app.service, ExplainClient(app.explain_redis, app.explain_settings))


SettingsDep = Annotated[Settings, Depends(get_settings)]
StateDep = Annotated[ServiceState, Depends(get_state)]
ExplainSettingsDep = Annotated[ExplainSettings, Depends(get_explain_settings)]
ExplanationsDep = Annotated[Explanations, Depends(get_explanations)]
