#!/usr/bin/env python3
"""Container health check of the shapserve image (Dockerfile.gpu's HEALTHCHECK).

One image runs three roles, so the check looks at what the container runs:

- ``python -m service``: healthy when ``GET http://127.0.0.1:$PORT/readyz`` answers 200
  (the model is loaded and warmed up);
- ``python -m worker``: healthy when Redis (``REDIS_URL``) answers and an RQ worker of this
  host is registered (its heartbeat has not expired);
- anything else (training, a shell): healthy while it runs.

Exit status 0: healthy, 1: unhealthy (the reason on stdout, which ``docker inspect`` shows).
"""

from __future__ import annotations

import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path

from settings import HealthSettings, SettingError, read  # scripts/settings.py, beside this file


def running_modules() -> set[str]:
    """The ``-m`` modules of the Python processes in this container (its PID namespace)."""
    found: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for i, arg in enumerate(argv[:-1]):
            if arg == b"-m":
                found.add(argv[i + 1].decode(errors="replace"))
    return found


def check_api(settings: HealthSettings) -> str | None:
    url = f"http://127.0.0.1:{settings.port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=4) as resp:
            return None if resp.status == 200 else f"{url} answered {resp.status}"
    except urllib.error.HTTPError as exc:
        return f"{url} answered {exc.code}: {exc.read(300).decode(errors='replace')}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{url}: {exc}"


def check_worker(settings: HealthSettings) -> str | None:
    import redis
    from rq import Worker

    url = settings.redis_url
    try:
        conn = redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)
        host = socket.gethostname()
        workers = [w for w in Worker.all(connection=conn) if w.hostname == host]
    except (redis.RedisError, OSError) as exc:
        return f"Redis at {url} does not answer: {exc}"
    return None if workers else f"no RQ worker of host {host} is registered in Redis (still loading the model?)"


def main() -> int:
    modules = running_modules()
    problem = None
    try:
        settings = read(HealthSettings)
    except SettingError as exc:
        print(f"unhealthy: {exc}")
        return 1
    if "service" in modules:
        problem = check_api(settings)
    elif "worker" in modules:
        problem = check_worker(settings)
    if problem:
        print(f"unhealthy: {problem}")
        return 1
    print(f"healthy ({', '.join(sorted(modules)) or 'no shapserve process'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
