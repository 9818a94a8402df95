"""A real Prometheus (Debian's package; .ci/run installs it) against a running API and worker.

- ``promtool check config`` / ``check rules`` / ``test rules`` on the shipped deploy/prometheus files;
- ``promtool check metrics`` on the API's /metrics output;
- a Prometheus server scraping the API and a worker's own metrics port every second, with the
  shipped alerts.yml loaded: after some /predict requests and one explanation computed by the
  worker, the p99 latency query returns a value, the worker shows up both through the API's
  queue-state gauges and on its own endpoint (the job counted there, and only there; busy back
  to 0), and every shipped rule evaluates without error on the real series.

Outside CI (``CI`` unset) the tests skip when the prometheus/promtool binaries are missing;
under CI they fail.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.services import free_port
from tests.support.workers import wait_for

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
QUEUE = "explain-prometheus"
P99_PREDICT = (
    "histogram_quantile(0.99, sum by (le) "
    '(rate(shapserve_http_request_duration_seconds_bucket{route="/predict", method="POST"}[1m])))'
)


def binary(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    message = f"`{name}` is not installed (Debian: apt-get install prometheus; .ci/run does it)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([binary("promtool"), *args], input=stdin, capture_output=True, timeout=60, cwd=PROM_DIR)


def test_promtool_checks_the_shipped_config_and_rules() -> None:
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml")):
        proc = promtool(*args)
        assert proc.returncode == 0, (args, proc.stdout.decode(), proc.stderr.decode())
    proc = promtool("test", "rules", "alerts_test.yml")
    assert proc.returncode == 0 and b"SUCCESS" in proc.stdout + proc.stderr, proc.stdout.decode() + proc.stderr.decode()


# -- a live Prometheus ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(start_service, explain_redis_url):
    """The API on the explanation tests' Redis database, with a queue of this module's own."""
    svc = start_service(env={"REDIS_URL": explain_redis_url, "EXPLAIN_QUEUE": QUEUE})
    yield svc
    svc.stop()


WORKER_METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def worker(start_worker, service_registry, api):
    started = start_worker(
        service_registry,
        env={
            "EXPLAIN_QUEUE": QUEUE,
            "EXPLAIN_METRICS_PORT": str(WORKER_METRICS_PORT),
            "EXPLAIN_METRICS_HOST": "127.0.0.1",
        },
    )
    yield started
    started.stop()


@pytest.fixture(scope="module")
def prometheus(api, worker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    exe = binary("prometheus")
    folder = tmp_path_factory.mktemp("prometheus")
    target = api.url.removeprefix("http://")
    # The shipped file's jobs, with static targets in place of Docker's DNS discovery.
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(PROM_DIR / "alerts.yml")],
        "scrape_configs": [
            {"job_name": "api", "static_configs": [{"targets": [target]}]},
            {"job_name": "worker", "static_configs": [{"targets": [f"127.0.0.1:{WORKER_METRICS_PORT}"]}]},
        ],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (folder / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [exe, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {(folder / 'prometheus.log').read_text()[-3000:]}")
        try:
            return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, 60, "prometheus to be ready")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def query(prom: str, expr: str) -> list[dict]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_a_live_prometheus_scrapes_the_api_and_answers_p99(prometheus, api, worker, cifar_jpeg) -> None:
    image = {"file": ("cat.jpg", cifar_jpeg, "image/jpeg")}
    # One small explanation, computed by the worker: counted on the worker's own endpoint.
    r = api.client.post("/explain", data={"samples": 40, "segments": 10}, files=image)
    assert r.status_code in (200, 202), r.text
    job = r.json()["status_url"]
    wait_for(lambda: api.client.get(job).json()["status"] in ("finished", "failed"), 300, "the explanation")
    assert api.client.get(job).json()["status"] == "finished", api.client.get(job).text + worker.log_tail()

    # /predict traffic while Prometheus scrapes every second, until the p99 query has a value.
    def p99() -> float | None:
        for _ in range(3):
            assert api.client.post("/predict", files=image).status_code == 200
        result = query(prometheus, P99_PREDICT)
        if result and not math.isnan(float(result[0]["value"][1])):
            return float(result[0]["value"][1])
        time.sleep(0.5)
        return None

    latency = wait_for(p99, 90, "a value for the p99 /predict latency")
    assert 0 < latency <= 10.0

    up = query(prometheus, 'up{job="api"}')
    assert [float(s["value"][1]) for s in up] == [1.0]
    # The worker's own endpoint, scraped as its own job.
    assert [float(s["value"][1]) for s in query(prometheus, 'up{job="worker"}')] == [1.0]
    done = wait_for(lambda: query(prometheus, 'shapserve_worker_jobs_total{job="worker", status="finished"} >= 1'),
                    30, "the worker's own count of the finished job")  # fmt: skip
    assert done
    assert float(query(prometheus, 'shapserve_worker_busy{job="worker"}')[0]["value"][1]) == 0
    assert float(query(prometheus, 'shapserve_worker_model_evaluations_total{job="worker"}')[0]["value"][1]) > 0
    info = query(prometheus, 'shapserve_worker_info{job="worker"}')[0]["metric"]
    assert info["queue"] == QUEUE and info["model_version"] == api.client.get("/readyz").json()["model"]["version"]
    assert float(query(prometheus, 'process_resident_memory_bytes{job="worker"}')[0]["value"][1]) > 0
    workers = query(prometheus, "max(shapserve_explain_workers)")
    assert float(workers[0]["value"][1]) >= 1, "the worker is not seen through the API's metrics"
    jobs = wait_for(lambda: query(prometheus, 'sum(shapserve_worker_job_duration_seconds_count{job="worker"}) >= 1'),
                    30, "the finished job in the worker's job-duration histogram")  # fmt: skip
    assert jobs
    assert float(query(prometheus, 'shapserve_worker_model_forward_seconds_total{job="worker"}')[0]["value"][1]) > 0
    # The API scrapes carry the queue's state only, never a job count or duration.
    assert query(prometheus, '{job="api", __name__=~"shapserve_.*job.*_(total|count|sum|bucket)"}') == []
    assert query(prometheus, '{job="api", __name__=~"shapserve_explain_model.*"}') == []
    version = query(prometheus, "shapserve_model_info")[0]["metric"]["version"]
    assert version == api.client.get("/readyz").json()["model"]["version"]

    # Every shipped rule has been evaluated on these real series, without an error.
    def evaluated() -> list[dict] | None:
        groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(rule["health"] != "unknown" for rule in rules) else None

    rules = wait_for(evaluated, 30, "every rule to be evaluated")
    shipped = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    assert len(rules) == sum(len(g["rules"]) for g in shipped["groups"])
    broken = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not broken, broken
    # A rule evaluated before its rate() window held two scrapes records nothing yet: poll for it.
    recorded = wait_for(lambda: query(prometheus, "shapserve:predict_latency_seconds:p99_5m"), 60,
                        "the recording rule's first value")  # fmt: skip
    assert float(recorded[0]["value"][1]) > 0


def test_promtool_accepts_the_worker_metrics(worker) -> None:
    text = httpx.get(f"http://127.0.0.1:{WORKER_METRICS_PORT}/metrics", timeout=10).content
    assert b"shapserve_worker_job_duration_seconds_bucket" in text
    proc = promtool("check", "metrics", stdin=text)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def test_promtool_accepts_the_api_metrics(api, cifar_jpeg) -> None:
    api.client.post("/predict", files={"file": ("cat.jpg", cifar_jpeg, "image/jpeg")})
    api.client.post("/predict", files={"file": ("x.jpg", b"not an image", "image/jpeg")})
    text = api.client.get("/metrics").content
    assert b"shapserve_http_request_duration_seconds_bucket" in text
    proc = promtool("check", "metrics", stdin=text)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
