"""What the checks of the deployment files (tests/test_deploy_config.py for compose and the
Dockerfile, tests/test_deploy_kubernetes.py for deploy/kubernetes) compare them with: the
settings' defaults, every environment variable the code reads, the API's routes.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from functools import cache

from tests.support.processes import ROOT


@cache
def settings_defaults() -> dict[str, object]:
    """``{VARIABLE: default}`` of the API's and the explanation settings."""
    from service.settings import Settings
    from shapcore.jobs.settings import ExplainSettings

    out: dict[str, object] = {}
    for cls in (ExplainSettings, Settings):
        out.update({name.upper(): field.default for name, field in cls.model_fields.items()})
    return out


@cache
def env_names() -> frozenset[str]:
    """Every environment variable the code reads: settings fields and direct reads."""
    from training.settings import TrainingSettings

    names = set(settings_defaults()) | {name.upper() for name in TrainingSettings.model_fields}
    spec = importlib.util.spec_from_file_location("shapserve_script_settings", ROOT / "scripts" / "settings.py")
    script_settings = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script_settings  # dataclasses look their module up there
    spec.loader.exec_module(script_settings)
    names |= script_settings.names(script_settings.RunSettings) | script_settings.names(script_settings.HealthSettings)
    direct = re.compile(
        r"""(?:os\.environ(?:\.get|\.setdefault|\.pop)?\(\s*|os\.environ\[\s*|os\.getenv\(\s*|env_float\(\s*)"""
        r"""["']([A-Z][A-Z0-9_]*)["']"""
    )
    sources = [*ROOT.glob("training/**/*.py"), *ROOT.glob("service/**/*.py"), *ROOT.glob("worker/**/*.py"),
               *ROOT.glob("scripts/*.py")]  # fmt: skip
    for path in sources:
        names.update(direct.findall(path.read_text()))
    return frozenset(names)


@cache
def api_routes() -> frozenset[str]:
    """The paths the API answers (its OpenAPI document and its mounted routes)."""
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings())
    paths = set(app.openapi()["paths"]) | {getattr(route, "path", None) for route in app.routes}
    paths.discard(None)
    assert {"/predict", "/readyz", "/metrics"} <= paths
    return frozenset(paths)
