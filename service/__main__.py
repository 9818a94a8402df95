"""``python -m service``: run the API under uvicorn (uvloop + httptools, one process).

Settings come from the environment (see service/settings.py). One process on purpose:
one copy of the model, and one batcher that sees every concurrent request (several
workers would split the batches and each hold a model; the forward pass already uses
every core through torch's threads).

``python -m service keys new NAME [--admin]`` mints an API key instead (service/auth.py).

Overload: uvicorn's ``limit_concurrency`` (``MAX_CONCURRENT_REQUESTS``, default 256) answers
503 at once, before the app sees the request, when that many connections are open or
requests in flight, instead of queueing without bound. 256 because the batcher's throughput
stops growing at about 64 concurrent requests (BENCHMARKS.md: ~300 req/s on 2 cores), so 256
in flight already means up to ~1 s of queueing at the CPU's rate, and 256 uploads of
``MAX_UPLOAD_BYTES`` (10 MB) bound the buffered bytes to ~2.5 GB. Idle keep-alive connections
count too: a proxy's pool of upstream connections must stay well below it. The listen
``backlog`` (``LISTEN_BACKLOG``) is kept as small: uvicorn accepts at once while its loop
runs, so the kernel queue only fills when the process is stuck, and then clients should be
refused, not parked.
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
        limit_concurrency=settings.max_concurrent_requests or None,
        backlog=settings.listen_backlog,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
