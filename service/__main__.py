"""``python -m service``: run the API under uvicorn (uvloop + httptools, one process).

Settings come from the environment (see service/settings.py). One process on purpose:
one copy of the model, and one batcher that sees every concurrent request (several
workers would split the batches and each hold a model; the forward pass already uses
every core through torch's threads).

``python -m service keys new NAME [--admin]`` mints an API key instead (service/auth.py).

Overload: the application's own gate (service/overload.py) refuses with 503 before reading
the upload: /predict beyond PREDICT_QUEUE_BUDGET_MS of queueing, any route beyond
MAX_CONCURRENT_REQUESTS requests in flight (256: at ~300 req/s on 2 cores that is already ~1 s
of queueing, and 256 uploads of ``MAX_UPLOAD_BYTES`` bound the buffered bytes to ~2.5 GB).
uvicorn's ``limit_concurrency`` is ``MAX_CONNECTIONS`` (2048), a bound on open connections:
refusals paced by the gate keep theirs open while they wait, so it must sit well above the
number of clients a flood brings (1,024 wrk connections in issue 27); each one costs at most
uvicorn's 64 KiB read-ahead buffer. The listen ``backlog`` (``LISTEN_BACKLOG``) is kept
small: uvicorn accepts at once while its loop runs, so the kernel queue only fills when the
process is stuck, and then clients should be refused, not parked.
"""

from __future__ import annotations

import logging
import sys

from service.settings import get_settings


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "keys":
        from service.auth import keys_cli

        return keys_cli(argv[1:])
    if argv:
        print(
            "usage: python -m service                        run the API (settings from the environment)\n"
            "       python -m service keys new NAME [--admin]  mint an API key",
            file=sys.stderr,
        )
        return 0 if argv[0] in ("-h", "--help", "help") else 2

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
    from service.auth import KeyConfigError, KeyRing

    try:
        KeyRing.from_settings(settings)
    except KeyConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from shapcore.errors import UserError
    from shapcore.registry import Registry

    try:
        Registry(settings.model_registry).resolve(settings.model_version)
        from shapcore.inference import resolve_device

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
        limit_concurrency=settings.max_connections or None,
        backlog=settings.listen_backlog,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
