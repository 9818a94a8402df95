"""The Redis data the suite owns, declared here and nowhere else.

The shared server (6379 unless the environment names another) holds two databases of the
suite's own, each flushed once per session: nothing else in tests/ names a database of it,
reads its URL from the environment or flushes anything (tests/test_suite_layout.py checks).

``redis_url``          (session) ``SHAPSERVE_TEST_REDIS_URL``, default database 13: the services'.
``explain_redis_url``  (session) ``SHAPSERVE_TEST_EXPLAIN_REDIS_URL``, default database 14: the
                       explanation queue's (workers and the services that submit to them).
``private_redis``      (function, :mod:`tests.support.private_redis`) a ``redis-server`` of the
                       test's own: for the tests that restart Redis, that must not lose a job when
                       another pytest session flushes the shared databases, or that read or scan
                       everything in their database. Never touches 6379.
:data:`DEAD_REDIS_URL` a URL where nothing listens (refused at once).
"""

from __future__ import annotations

import os

import pytest

TEST_REDIS_URL = os.environ.get("SHAPSERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
EXPLAIN_REDIS_URL = os.environ.get("SHAPSERVE_TEST_EXPLAIN_REDIS_URL", "redis://127.0.0.1:6379/14")
#: Nothing listens on port 1: a connection is refused at once.
DEAD_REDIS_URL = "redis://127.0.0.1:1/0"


def claim_database(url: str) -> str:
    """Empty the suite's own database at ``url`` (once per session); fail the test if Redis is not there."""
    import redis

    conn = redis.Redis.from_url(url)
    try:
        conn.ping()
        conn.flushdb()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis is not reachable at {url}: {exc}")
    finally:
        conn.close()
    return url


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The services' database of the shared Redis (flushed once per session)."""
    return claim_database(TEST_REDIS_URL)


@pytest.fixture(scope="session")
def explain_redis_url() -> str:
    """The explanation queue's database of the shared Redis (flushed once per session)."""
    return claim_database(EXPLAIN_REDIS_URL)


def purge_queue(redis_url: str, queue: str) -> None:
    """Delete the queue, its jobs, their de-duplication keys and any per-key in-flight sets."""
    import redis
    from rq import Queue

    conn = redis.Redis.from_url(redis_url)
    try:
        q = Queue(queue, connection=conn)
        for job in q.jobs:
            key = (job.meta or {}).get("dedup_key")
            if key:
                conn.delete(key)
            job.delete()
        q.delete(delete_jobs=True)
        for key in conn.scan_iter(f"shapserve:explain:inflight:{queue}:*"):
            conn.delete(key)
    finally:
        conn.close()
