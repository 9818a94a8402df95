"""API keys, rate limits, per-key job caps, request timeouts and the concurrency limit (issue 6).

Real HTTP against ``python -m service`` subprocesses and a real ``redis-server`` of this
module's own (tests/support/private_redis.py: the tests read and scan everything in it, so
nothing of anyone else's may be there). Two configurations, each started once for the module:

``secured``  two replicas sharing one Redis, keys from a file *and* API_KEYS, REQUIRE_API_KEYS,
             low rate limits (8/minute per key), EXPLAIN_MAX_JOBS_PER_KEY=2, no worker (jobs
             stay queued), debug logs and the access log on (to look for leaked keys).
``open``     no keys (the local default), Redis unreachable (rate limits fall back to memory),
             REQUEST_TIMEOUT_S=5, MAX_CONCURRENT_REQUESTS=6.

Plus in-process checks of the key ring and start-up refusals of ``python -m service``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from tests.support.private_redis import PrivateRedis
from tests.support.redisdb import DEAD_REDIS_URL
from tests.support.services import ROOT, RunningService, metric, metric_or
from tests.support.services import image_file as image
from tests.support.workers import wait_for

SMALL = {"segments": "12", "samples": "60"}
FAST_START = {"JIT": "false", "WARMUP": "false"}
OPEN_TIMEOUT_S = 5
OPEN_CONCURRENCY = 6
#: Only guards against a hang (a loaded machine may be slow); no test here claims a speed.
HANG_GUARD_S = 60


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def xkey(secret: str) -> dict[str, str]:
    return {"X-API-Key": secret}


def run_service_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for name in ("API_KEYS", "API_KEYS_FILE", "REQUIRE_API_KEYS"):
        if env is None or name not in env:
            full_env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "service", *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


# -- the key ring, in process -------------------------------------------------------------------------------


def test_key_ring_stores_hashes_and_compares_every_entry(monkeypatch):
    from service import auth

    minted = [auth.mint(f"k{i}", admin=i == 0) for i in range(5)]
    ring = auth.KeyRing([key for _, key in minted])
    assert all(secret not in repr(ring.keys) for secret, _ in minted)
    assert all(len(secret) >= 40 and secret.startswith("ssk_") for secret, _ in minted)
    assert len({secret for secret, _ in minted}) == 5

    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    for secret, key in [*minted, ("ssk_not-a-key", None)]:
        calls.clear()
        found = ring.lookup(secret)
        assert found == key
        assert len(calls) == 5  # no early exit, wherever the match is (or none)
    assert ring.lookup(minted[0][1].digest.hex()) is None  # the stored hash is not a key


def test_key_entries_parse_and_bad_ones_are_refused(tmp_path):
    from service import auth

    s1, k1 = auth.mint("alice")
    _, k2 = auth.mint("root", admin=True)
    path = tmp_path / "keys"
    path.write_text(f"# shapserve keys\n\n{k1.entry()}\n  {k2.entry()}  \n# revoked: bob\n")
    assert auth.parse_file(path) == [k1, k2]
    assert auth.parse_env(f" {k1.entry()},{k2.entry()}\n") == [k1, k2]
    assert k2.entry().endswith(":admin") and not k1.entry().endswith(":admin")

    with pytest.raises(auth.KeyConfigError, match="not 64 hex digits") as exc:
        auth.parse_env(f"alice:{s1}")  # the key itself instead of its hash
    assert s1 not in str(exc.value)
    with pytest.raises(auth.KeyConfigError, match="unknown scope"):
        auth.parse_env(f"alice:{k1.digest.hex()}:root")
    with pytest.raises(auth.KeyConfigError, match="configured twice"):
        auth.KeyRing([k1, auth.ApiKey("alice", k2.digest)])
    with pytest.raises(auth.KeyConfigError, match="same hash"):
        auth.KeyRing([k1, auth.ApiKey("bob", k1.digest)])
    with pytest.raises(auth.KeyConfigError, match="cannot read"):
        auth.parse_file(tmp_path / "missing")


def test_settings_refuse_a_malformed_rate_limit():
    from pydantic import ValidationError

    from service.settings import Settings

    assert Settings(rate_limit_predict=" 20/second;1000/minute ").rate_limit_predict == "20/second;1000/minute"
    with pytest.raises(ValidationError, match="not a rate limit"):
        Settings(rate_limit_explain="lots")


# -- python -m service: minting, start-up refusals ------------------------------------------------------------


def test_keys_cli_mints_a_key_once_and_startup_refuses_bad_key_setups(tmp_path):
    out = run_service_cli("keys", "new", "ops", "--admin")
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(":", 1) for line in out.stdout.strip().splitlines())
    secret, entry = lines["key"].strip(), lines["entry"].strip()
    name, digest, scope = entry.split(":")
    assert (name, scope) == ("ops", "admin") and digest == hashlib.sha256(secret.encode()).hexdigest()
    assert "cannot be shown again" in out.stderr
    again = run_service_cli("keys", "new", "ops")
    assert secret not in again.stdout and again.stdout.count(":admin") == 0
    assert run_service_cli("keys", "new", "bad name").returncode == 2

    # The registry is empty: had the model been loaded first, that would have failed instead.
    required = run_service_cli(env={"REQUIRE_API_KEYS": "true", "MODEL_REGISTRY": str(tmp_path)})
    assert required.returncode == 2
    assert "REQUIRE_API_KEYS is true but no API key is configured" in required.stderr
    missing = run_service_cli(env={"API_KEYS_FILE": str(tmp_path / "nope")})
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    raw = run_service_cli(env={"API_KEYS": f"ops:{secret}"})
    assert raw.returncode == 2 and "not 64 hex digits" in raw.stderr and secret not in raw.stderr


# -- the secured configuration ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def security_redis_server(tmp_path_factory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path_factory.mktemp("security-redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def security_redis(security_redis_server: PrivateRedis) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(security_redis_server.url())
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, str]:
    """name -> secret; alice, bob, dave and root (admin) in a keys file, carol and erin in API_KEYS."""
    from service import auth

    minted = {name: auth.mint(name, admin=name == "root") for name in ("alice", "bob", "carol", "dave", "erin", "root")}
    folder = tmp_path_factory.mktemp("keys")
    lines = ["# shapserve API keys: name:sha256[:admin]", ""]
    lines += [minted[n][1].entry() for n in ("alice", "bob", "dave", "root")]
    (folder / "api-keys").write_text("\n".join(lines) + "\n")
    secrets_ = {name: secret for name, (secret, _) in minted.items()}
    secrets_["_file"] = str(folder / "api-keys")
    secrets_["_env"] = f"{minted['carol'][1].entry()}, {minted['erin'][1].entry()}"
    return secrets_


@pytest.fixture(scope="module")
def secured(start_service, security_redis_server, keys) -> Iterator[tuple[RunningService, RunningService]]:
    """Two replicas of the secured configuration, started side by side."""
    env = {
        **FAST_START,
        "REDIS_URL": security_redis_server.url(),
        "API_KEYS_FILE": keys["_file"],
        "API_KEYS": keys["_env"],
        "REQUIRE_API_KEYS": "true",
        "RATE_LIMIT_PREDICT": "8/minute",
        "RATE_LIMIT_EXPLAIN": "8/minute",
        "EXPLAIN_MAX_JOBS_PER_KEY": "2",
        "EXPLAIN_QUEUE": "explain-security",
        "LOG_LEVEL": "debug",
        "ACCESS_LOG": "true",
    }
    replicas = [start_service(env=env, wait=None) for _ in range(2)]
    for svc in replicas:
        svc.wait("ready")
    yield replicas[0], replicas[1]
    for svc in replicas:
        svc.stop()


PROTECTED = [
    ("POST", "/predict"),
    ("POST", "/explain"),
    ("GET", "/model"),
    ("GET", "/model/confusion-matrix.png"),
    ("POST", "/model/reload"),
    ("GET", "/explain/00000000-0000-4000-8000-000000000000"),
    ("GET", "/no-such-route"),
]


def test_public_routes_need_no_key(secured):
    api, _ = secured
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
        assert api.client.get(path).status_code == 200, path
    assert "API keys: 6 configured (1 admin)" in api.log_tail(200_000)


def test_openapi_declares_the_key_schemes_and_the_refusals(secured, open_service):
    spec = secured[0].client.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer <key>`"}
    assert schemes["apiKeyHeader"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    for method, path in PROTECTED[:-1]:  # every documented protected route
        template = "/explain/{job_id}" if path.startswith("/explain/") else path
        operation = spec["paths"][template][method.lower()]
        assert operation["security"] == [{"bearerAuth": []}, {"apiKeyHeader": []}], (method, path)
        assert {"401", "403", "503"} <= set(operation["responses"]), (method, path)
    for path in ("/healthz", "/readyz", "/metrics"):
        assert "security" not in spec["paths"][path]["get"] and "401" not in spec["paths"][path]["get"]["responses"]
    # 429 where a rate limit is configured (POST /predict and /explain here), nowhere else
    limited = {(m, p) for p, ops in spec["paths"].items() for m, op in ops.items() if "429" in op["responses"]}
    assert limited == {("post", "/predict"), ("post", "/explain")}
    ref = spec["paths"]["/model"]["get"]["responses"]["401"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.rsplit("/", 1)[-1] in spec["components"]["schemas"]
    # an open deployment advertises no scheme and no 401
    open_spec = open_service.client.get("/openapi.json").json()
    assert "securitySchemes" not in open_spec.get("components", {})
    assert "401" not in open_spec["paths"]["/predict"]["post"]["responses"]


def test_no_key_is_401_and_a_wrong_key_is_403(secured, keys, cifar_jpeg):
    api, _ = secured
    for method, path in PROTECTED:
        r = api.client.request(method, path, files=image(cifar_jpeg) if method == "POST" else None)
        assert r.status_code == 401, (method, path, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["error"]["code"] == "unauthorized"
    assert api.client.get("/model", headers={"Authorization": "Basic YWxpY2U6cHc="}).status_code == 401
    both = {**bearer(keys["alice"]), **xkey(keys["bob"])}
    assert api.client.get("/model", headers=both).json()["error"]["message"].startswith("Authorization and X-API-Key")

    digest = hashlib.sha256(keys["alice"].encode()).hexdigest()
    for headers in (bearer("ssk_wrong"), xkey("ssk_wrong"), bearer(digest), bearer(keys["alice"] + "x")):
        for method, path in PROTECTED:
            r = api.client.request(method, path, headers=headers)
            assert r.status_code == 403, (method, path, r.text)
            assert r.json()["error"]["code"] == "forbidden"


def test_bearer_and_x_api_key_are_both_accepted(secured, keys, cifar_jpeg):
    api, _ = secured
    for headers in (bearer(keys["alice"]), xkey(keys["alice"]), {**bearer(keys["alice"]), **xkey(keys["alice"])}):
        assert api.client.get("/model", headers=headers).status_code == 200
    r = api.client.post("/predict", files=image(cifar_jpeg), headers={"x-api-key": keys["alice"]})
    assert r.status_code == 200 and r.json()["predictions"]


def test_model_reload_needs_the_admin_scope(secured, keys):
    api, _ = secured
    denied = api.client.post("/model/reload", headers=bearer(keys["alice"]))
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "admin_required"
    ok = api.client.post("/model/reload", headers=bearer(keys["root"]))
    assert ok.status_code == 200, ok.text
    assert ok.json()["changed"] is False


def test_a_job_is_readable_only_with_the_key_that_created_it(secured, keys, cifar_jpeg, security_redis):
    api, other_replica = secured
    first = api.client.post("/explain", files=image(cifar_jpeg), data=SMALL, headers=bearer(keys["alice"]))
    assert first.status_code == 202, first.text
    job = first.json()
    again = api.client.post("/explain", files=image(cifar_jpeg), data=SMALL, headers=xkey(keys["alice"]))
    assert again.json()["job_id"] == job["job_id"] and again.json()["deduplicated"] is True
    bobs = api.client.post("/explain", files=image(cifar_jpeg), data=SMALL, headers=bearer(keys["bob"]))
    assert bobs.status_code == 202 and bobs.json()["job_id"] != job["job_id"]  # never a shared job
    assert bobs.json()["deduplicated"] is False

    for svc in (api, other_replica):
        mine = svc.client.get(job["status_url"], headers=bearer(keys["alice"]))
        assert mine.status_code == 200 and mine.json()["status"] == "queued"
        heat = svc.client.get(job["heatmap_url"], headers=bearer(keys["alice"]))
        assert heat.status_code == 409 and heat.json()["error"]["code"] == "not_ready"
        unknown = svc.client.get("/explain/00000000-0000-4000-8000-000000000000", headers=bearer(keys["bob"]))
        for url in (job["status_url"], job["heatmap_url"]):
            theirs = svc.client.get(url, headers=bearer(keys["bob"]))
            assert theirs.status_code == 404
            assert theirs.json()["error"]["code"] == unknown.json()["error"]["code"] == "not_found"
        assert svc.client.get(bobs.json()["status_url"], headers=bearer(keys["alice"])).status_code == 404

    from rq.job import Job

    meta = Job.fetch(job["job_id"], connection=security_redis).meta
    assert meta["owner"] == "alice"


def test_per_key_cap_on_jobs_in_flight(secured, keys, cifar_jpeg, security_redis):
    api, other_replica = secured
    dave = bearer(keys["dave"])
    ids = []
    for seed, svc in (("1", api), ("2", other_replica)):
        r = svc.client.post("/explain", files=image(cifar_jpeg), data={**SMALL, "seed": seed}, headers=dave)
        assert r.status_code == 202, r.text
        ids.append(r.json()["job_id"])
    over = api.client.post("/explain", files=image(cifar_jpeg), data={**SMALL, "seed": "3"}, headers=dave)
    assert over.status_code == 429, over.text
    assert over.json()["error"]["code"] == "too_many_jobs" and int(over.headers["retry-after"]) >= 1
    dup = other_replica.client.post("/explain", files=image(cifar_jpeg), data={**SMALL, "seed": "1"}, headers=dave)
    assert dup.status_code == 202 and dup.json()["job_id"] == ids[0]  # no new work: not refused
    # Another key is not affected; a slot frees when one of dave's jobs ends.
    bob = api.client.post("/explain", files=image(cifar_jpeg), data={**SMALL, "seed": "3"}, headers=xkey(keys["bob"]))
    assert bob.status_code == 202
    from rq.job import Job

    Job.fetch(ids[1], connection=security_redis).cancel()
    freed = api.client.post("/explain", files=image(cifar_jpeg), data={**SMALL, "seed": "3"}, headers=dave)
    assert freed.status_code == 202, freed.text
    text = api.client.get("/metrics").text
    assert metric(text, "shapserve_explain_requests_total", outcome="too_many_jobs") >= 1


def test_rate_limits_are_per_key_and_shared_by_the_replicas(secured, keys, cifar_jpeg, security_redis):
    a, b = secured
    carol = bearer(keys["carol"])
    before = metric(a.client.get("/metrics").text, "shapserve_rate_limited_total", route="/predict")
    # 8 per minute and key, whichever replica answers
    statuses = [svc.client.post("/predict", files=image(cifar_jpeg), headers=carol).status_code
                for svc in (a, b, a, b, a, b, a, b)]  # fmt: skip
    assert statuses == [200] * 8
    refused = b.client.post("/predict", files=image(cifar_jpeg), headers=carol)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert a.client.post("/predict", files=image(cifar_jpeg), headers=carol).status_code == 429
    assert b.client.post("/predict", files=image(cifar_jpeg), headers=bearer(keys["bob"])).status_code == 200
    assert a.client.get("/model", headers=carol).status_code == 200  # only /predict and /explain are limited
    assert metric(a.client.get("/metrics").text, "shapserve_rate_limited_total", route="/predict") == before + 1
    assert any(security_redis.scan_iter("shapserve:ratelimit*"))

    # /explain has its own budget, counted before the upload is read (even bad requests count)
    erin = xkey(keys["erin"])
    codes = [svc.client.post("/explain", headers=erin).status_code for svc in (a, b) * 4]
    assert codes == [400] * 8
    limited = b.client.post("/explain", files=image(cifar_jpeg), data=SMALL, headers=erin)
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
    text = b.client.get("/metrics").text
    assert metric(text, "shapserve_rate_limited_total", route="/explain") == 1
    # refusals made before routing are still counted under their route, not as <unmatched>
    assert metric(text, "shapserve_http_requests_total", route="/explain", method="POST", status="429") >= 1


def test_auth_failures_are_counted(secured, keys):
    api, _ = secured

    def counts() -> dict[str, float]:
        text = api.client.get("/metrics").text
        return {r: metric(text, "shapserve_auth_failures_total", reason=r) for r in
                ("missing_key", "invalid_key", "not_admin")}  # fmt: skip

    def refused(status: str) -> float:
        text = api.client.get("/metrics").text
        # A labelled counter appears at its first increment: absent before the first refusal.
        return metric_or(text, "shapserve_http_requests_total", 0.0, route="/model", method="GET", status=status)

    before = counts()
    before_401, before_403 = refused("401"), refused("403")
    api.client.get("/model")
    api.client.get("/model", headers=xkey("ssk_nope"))
    api.client.get("/model", headers=xkey("ssk_nope"))
    api.client.post("/model/reload", headers=xkey(keys["bob"]))
    after = counts()
    assert {r: after[r] - before[r] for r in after} == {"missing_key": 1, "invalid_key": 2, "not_admin": 1}
    # refused before routing, yet labelled with their route (not <unmatched>)
    assert (refused("401") - before_401, refused("403") - before_403) == (1, 2)


def test_keys_never_reach_the_logs_or_redis(secured, keys, security_redis):
    """Runs last in the module: every key above has been used, with debug logs and the access log on."""
    api, other = secured
    logs = api.log_tail(10_000_000) + other.log_tail(10_000_000)
    assert "POST /predict" in logs  # the access log was on
    stored = b"".join((security_redis.dump(k) or b"") + k for k in security_redis.scan_iter("*"))
    for name in ("alice", "bob", "carol", "dave", "erin", "root"):
        secret = keys[name]
        assert secret not in logs, f"{name}'s key is in a log"
        assert secret[4:20] not in logs
        assert secret.encode() not in stored and secret[4:20].encode() not in stored, f"{name}'s key is in Redis"


# -- the open configuration ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def open_service(start_service) -> Iterator[RunningService]:
    svc = start_service(env={
        **FAST_START,
        "REDIS_URL": DEAD_REDIS_URL,
        "RATE_LIMIT_PREDICT": "4/minute",
        "RATE_LIMIT_EXPLAIN": "2/minute",
        "REQUEST_TIMEOUT_S": str(OPEN_TIMEOUT_S),
        "MAX_CONCURRENT_REQUESTS": str(OPEN_CONCURRENCY),
    })  # fmt: skip
    # No idle keep-alive connection of ours may count against the concurrency limit.
    svc.client.close()
    svc.client = httpx.Client(base_url=svc.url, timeout=30, limits=httpx.Limits(max_keepalive_connections=0))
    yield svc
    svc.stop()


def slow_upload(url: str, path: str = "/model/reload", length: int = 1000) -> socket.socket:
    """A request whose body never finishes: headers and one byte of a ``length``-byte body."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    head = (f"POST {path} HTTP/1.1\r\nHost: {parts.hostname}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n{{")  # fmt: skip
    sock.sendall(head.encode())
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def test_open_mode_logs_a_loud_warning(open_service):
    log = open_service.log_tail(200_000)
    assert "WARNING" in log and "API keys are OFF" in log
    assert open_service.client.get("/model").status_code == 200  # no key needed


def test_a_trickling_upload_is_cut_off_after_the_request_timeout(open_service):
    sock = slow_upload(open_service.url)
    start = time.monotonic()
    try:
        sock.settimeout(0.5)
        while time.monotonic() - start < OPEN_TIMEOUT_S + HANG_GUARD_S:
            try:
                sock.recv(1, socket.MSG_PEEK)
                break  # the answer (or the end) is there: stop sending
            except TimeoutError:
                sock.sendall(b" ")  # a byte every half second: never idle, never finished
        sock.settimeout(10)
        status, headers, body = read_response(sock)
    finally:
        sock.close()
    elapsed = time.monotonic() - start
    assert status == 503
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert headers["connection"] == "close"
    assert elapsed >= OPEN_TIMEOUT_S - 0.5  # cut off by the request timeout, not before it
    assert metric(open_service.client.get("/metrics").text, "shapserve_request_timeouts_total") >= 1


def test_a_flood_beyond_the_concurrency_limit_is_refused_fast(open_service):
    holders = [slow_upload(open_service.url) for _ in range(OPEN_CONCURRENCY - 1)]

    def holders_in() -> bool:  # with every holder counted, one more connection reaches the limit
        return open_service.client.get("/model").status_code == 503

    wait_for(holders_in, HANG_GUARD_S, "the held uploads to fill the service", interval=0.05)

    async def flood(n: int) -> list[tuple[int, float, str]]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=open_service.url, timeout=30, limits=limits) as client:

            async def one() -> tuple[int, float, str]:
                # uvicorn refuses before routing, so the route does not matter; a GET sends no body
                # that could still be arriving when the refused connection is closed (a TCP reset).
                try:
                    r = await client.get("/model")
                    return r.status_code, r.text
                except httpx.HTTPError as exc:
                    return 0, repr(exc)

            return await asyncio.gather(*(one() for _ in range(n)))

    try:
        results = asyncio.run(flood(40))
        # Refused, not queued: a request that waited for a holder's slot would get /model's 200.
        # (How fast the refusals come is a speed, not asserted here.)
        assert [s for s, _ in results] == [503] * 40, results[:3]
        # the held requests are still there, and are answered (timed out) in time
        for sock in holders:
            sock.settimeout(OPEN_TIMEOUT_S + HANG_GUARD_S)
            status, _, body = read_response(sock)
            assert status == 503 and json.loads(body)["error"]["code"] == "request_timeout"
    finally:
        for sock in holders:
            sock.close()
    # ...and the service serves again
    assert open_service.client.get("/healthz").status_code == 200
    assert open_service.client.get("/model").status_code == 200
    assert open_service.proc.poll() is None


def test_rate_limits_fall_back_to_memory_without_redis(open_service, cifar_jpeg):
    client = open_service.client
    statuses = [client.post("/predict", files=image(cifar_jpeg)).status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 200, 429]  # 4/minute for 127.0.0.1, counted in memory
    r = client.post("/predict", files=image(cifar_jpeg))
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
    assert r.json()["error"]["code"] == "rate_limited"

    explain = [client.post("/explain", files=image(cifar_jpeg), data=SMALL) for _ in range(3)]
    assert [e.status_code for e in explain] == [503, 503, 429]
    assert explain[0].json()["error"]["code"] == "queue_unavailable"
    assert "counting in this replica's memory" in open_service.log_tail(200_000)
    assert client.get("/readyz").json()["redis"]["ok"] is False


def test_compose_turns_keys_and_limits_on():
    import yaml

    api = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["api"]["environment"]
    assert api["REQUIRE_API_KEYS"] == "true"
    assert api["API_KEYS"] == "${SHAPSERVE_API_KEYS:-}"
    assert api["RATE_LIMIT_PREDICT"] and api["RATE_LIMIT_EXPLAIN"]
