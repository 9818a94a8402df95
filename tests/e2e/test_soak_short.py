"""The soak, short (~60 s): ``bench/soak.py`` attached to a real API and worker at a modest
rate of /predict and /explain together. Correctness goals only, never speed: goodput (the
rates are well within capacity, so nearly every request must be served, not refused or shed),
no 5xx other than refusals, no transport error, every accepted job accounted for and
finished, RSS growth under 10 %.

The 10-minute run at twice the measured capacity is not part of the suite (see
``bench/soak.py --help`` and BENCHMARKS.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.services import ROOT

pytestmark = pytest.mark.timeout(300)

SOAK_S = 45
WARMUP_S = 8
#: Share of the requests offered (sent or shed by the client) that must be served 2xx, per
#: endpoint. 20 /predict/s and one /explain every 2 s are a fraction of what one API and one
#: worker answer on the smallest machine (BENCHMARKS.md); a few refusals may come from a
#: neighbour's burst of CPU on a shared machine, a service refusing much is broken.
GOODPUT = 0.95


def test_short_soak_meets_the_correctness_goals(
    start_service, start_worker, service_registry, private_redis, cifar_jpeg, tmp_path: Path
):
    # Its own Redis: a pytest session starting beside this one flushes the shared databases.
    env = {"REDIS_URL": private_redis.url(), "EXPLAIN_QUEUE": "explain-soak-short"}
    worker = start_worker(service_registry, env=env, wait=False)
    api = start_service(env=env)
    worker.wait_listening()
    image = tmp_path / "cat.jpg"
    image.write_bytes(cifar_jpeg)
    out = tmp_path / "results"
    command = [
        sys.executable, "bench/soak.py", "--url", api.url, "--api-pid", str(api.pid),
        "--worker-pid", str(worker.pid), "--duration-s", str(SOAK_S), "--warmup-s", str(WARMUP_S),
        "--predict-rate", "20", "--explain-rate", "0.5", "--explain-segments", "12", "--explain-samples", "60",
        "--drain-s", "60", "--sample-interval-s", "1", "--image", str(image), "--label", "ci-short",
        "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    print(proc.stdout, proc.stderr[-3000:])
    paths = list(out.glob("soak-ci-short-*.json"))
    assert len(paths) == 1, (proc.returncode, proc.stderr[-3000:])
    result = json.loads(paths[0].read_text())
    summary = result["summary"]
    check_goodput(summary)
    assert summary["other_5xx"] == 0, summary["by_endpoint"]
    assert summary["other_4xx"] == 0, summary["by_endpoint"]  # every request sent is valid
    assert summary["transport_errors"] == 0, summary["by_endpoint"]
    check_jobs_accounted_for(result)
    memory = summary["memory"]
    assert {"api", "worker"} <= set(memory), memory
    # The long-lived processes must not grow. Work horses are forked anew for every job, so
    # "horse" compares different short-lived processes caught at different stages of their jobs
    # (in 45 s the first fifth catches the first horses early): reported, not asserted; a leak
    # in what they inherit would show in the worker parent.
    for role in ("api", "worker"):
        m = memory[role]
        assert m["growth"] is None or m["growth"] < 0.10, (role, m)
    assert memory["api"]["growth"] is not None and memory["worker"]["growth"] is not None, memory
    # Every goal of the script but its RSS one, which also counts the horses (checked per role above).
    goals = {name: ok for name, ok in summary["goals"].items() if name != "rss_growth_under_10pct"}
    assert goals and all(goals.values()), (summary["goals"], proc.stdout)
    assert api.proc.poll() is None and worker.proc.poll() is None


def check_goodput(summary: dict) -> None:
    """Per endpoint: 2xx over everything offered in the soak (answered or shed by the client)."""
    for endpoint in ("predict", "explain"):
        answers = summary["by_endpoint"].get(endpoint, {})
        offered = sum(answers.values()) + summary["shed_by_client"].get(endpoint, 0)
        served = sum(n for status, n in answers.items() if status.startswith("2"))
        assert offered > 0 and served >= GOODPUT * offered, (endpoint, served, offered, summary["by_endpoint"],
                                                            summary["refusals"], summary["shed_by_client"])  # fmt: skip


def check_jobs_accounted_for(result: dict) -> None:
    """Every 202 of the warm-up and the soak is one job, followed to its end, and finished."""
    summary = result["summary"]
    jobs = summary["explain_jobs"]
    accepted_202 = summary["by_endpoint"]["explain"].get("202", 0) + result["warmup_answers"].get("explain 202", 0)
    assert jobs["accepted"] == accepted_202 > 0, (jobs, accepted_202)  # each accepted request has its job
    assert jobs["accepted_in_soak"] == summary["by_endpoint"]["explain"].get("202", 0), jobs
    assert jobs.get("lost", 0) == 0, jobs
    assert jobs.get("finished", 0) == jobs["accepted"], jobs  # none failed, none left pending
