"""``python -m service``: run the API under uvicorn (uvloop + httptools, one process).

Settings come from the environment (see service/settings.py). One process on purpose:
one copy of the model, and one batcher that sees every concurrent request (several
workers would split the batches and each hold a model; the forward pass already uses
every core through torch's threads).
"""

from __future__ import annotations

import logging
import sys

from service.settings import get_settings


def main() -> int:
    from pydantic import ValidationError

    try:
        settings = get_settings()
    except ValidationError as exc:
        print(f"error: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    logging.getLogger("uvicorn.access").disabled = not settings.access_log

    # Fail fast, with one line, on what can be checked before importing torch's weight.
    from training.errors import UserError
    from training.registry import Registry

    try:
        Registry(settings.model_registry).resolve(settings.model_version)
        from service.engine import resolve_device

        resolve_device(settings.device)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import uvicorn

    from service.app import create_app

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_keep_alive=30,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
