"""The bad-input corpus (tests/support/bad_inputs.py) against ONE live service, over real HTTP.

One ``python -m service`` subprocess, on the explanation tests' Redis database with a queue of
its own (no worker: the 202s only queue jobs, and the queue is emptied at the end), answers:

* every corpus entry with its expected status and error code, and a message holding the
  expected fragment; odd-but-valid images answer 200, and those marked ``same_as`` give the
  very predictions of the upright picture; accepted explanations answer 202 and queue exactly
  one job each (identical requests share one);
* after the whole corpus, several times: still the same predictions for the same picture,
  every refusal counted in ``shapserve_rejected_inputs_total`` under its code, and no leak:
  after one warm-up round, three more rounds may not grow the resident set or its peak by
  more than :data:`RSS_GROWTH_BOUND_KIB` (one leaked upload, decoded bomb or 50 MB body per
  round would be several times that);
* on a *fresh* process (VmHWM never falls, so a service that has already seen the big inputs
  cannot show what they cost): after two rounds of every other case, the :data:`BIG` ones
  (the 12000x12000 bombs, the 50 MB bodies, the field over the limit) may not raise the peak
  by more than :data:`PEAK_GROWTH_BOUND_KIB` (the 50 MB body is never held, the 144 Mpx bomb
  never decoded).
"""

from __future__ import annotations

import collections
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import REJECT_REASONS
from tests.support import bad_inputs as corpus
from tests.support.bad_inputs import CORPUS, BadInput
from tests.support.redisdb import purge_queue
from tests.support.services import RunningService

pytestmark = pytest.mark.timeout(600)

#: Codes that a refusal counts in shapserve_rejected_inputs_total (routing's 404/405 are not inputs):
#: the metric's own label values, one list for the service and the test.
COUNTED = set(REJECT_REASONS)
ROUNDS = 3
#: Growth of VmRSS (and of VmHWM) over ROUNDS rounds of the corpus after a warm-up round.
RSS_GROWTH_BOUND_KIB = 8 * 1024
#: Peak RSS growth of a fresh, warmed-up service over the big cases (the largest request
#: held is ~10 MB and the warm-up has held it already; a buffered 50 MB body or a decoded
#: 12000x12000 bomb would be 50-430 MB).
PEAK_GROWTH_BOUND_KIB = 40 * 1024
#: The cases whose cost the peak check measures: refused before their size is held or decoded.
BIG = frozenset(
    {"png_bomb_12000x12000", "explain_png_bomb", "upload_50mb_declared", "upload_50mb_chunked", "text_field_over_limit"}
)
assert {case.name for case in CORPUS} >= BIG, "a big case was renamed"


@pytest.fixture(scope="module")
def corpus_queue(explain_redis_url: str) -> Iterator[str]:
    name = f"bad-input-corpus-{uuid.uuid4().hex[:8]}"
    yield name
    purge_queue(explain_redis_url, name)


def corpus_env(redis_url: str, queue: str) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url,
        "EXPLAIN_QUEUE": queue,
        "EXPLAIN_MAX_JOBS_PER_KEY": "0",  # the at-bound cases queue ~10 jobs from one client
        "MAX_UPLOAD_BYTES": str(corpus.MAX_UPLOAD_BYTES),
        "MAX_IMAGE_PIXELS": str(corpus.MAX_IMAGE_PIXELS),
        "MAX_FILES_PER_REQUEST": str(corpus.MAX_FILES),
    }


@pytest.fixture(scope="module")
def corpus_service(start_service, explain_redis_url: str, corpus_queue: str) -> Iterator[RunningService]:
    svc = start_service(env=corpus_env(explain_redis_url, corpus_queue))
    yield svc
    svc.stop()


def send(svc: RunningService, case: BadInput, source: bytes) -> httpx.Response:
    request = case.make(source)
    try:
        return svc.client.request(request.method, request.path, **request.kwargs)
    except httpx.HTTPError as exc:
        raise AssertionError(f"{case.name}: no answer ({type(exc).__name__}: {exc})\n{svc.log_tail()}") from None


def top(response: httpx.Response) -> list[tuple[int, float]]:
    return [(p["index"], p["probability"]) for p in response.json()["predictions"]]


def problem(case: BadInput, r: httpx.Response, reference: dict[str, list[tuple[int, float]]]) -> str | None:
    """What is wrong with the answer to ``case``, or None."""
    if r.status_code != case.status:
        return f"status {r.status_code}, expected {case.status}: {r.text[:300]}"
    if r.status_code >= 500:
        return f"server error: {r.text[:300]}"
    if not r.headers.get("content-type", "").startswith("application/json"):
        return f"content-type {r.headers.get('content-type')!r}"
    body = r.json()
    if case.code is not None:
        error = body.get("error") or {}
        if error.get("code") != case.code:
            return f"code {error.get('code')!r}, expected {case.code!r}: {error.get('message')!r}"
        if case.text is not None and case.text not in error.get("message", ""):
            return f"message {error.get('message')!r} lacks {case.text!r}"
        if len(error.get("message", "")) < 10:
            return f"message too short to help: {error.get('message')!r}"
    elif case.status == 200:
        preds = body["predictions"]
        if not preds or [p["probability"] for p in preds] != sorted((p["probability"] for p in preds), reverse=True):
            return f"bad predictions {preds}"
        if case.same_as is not None:
            want, got = reference[case.same_as], top(r)
            if [i for i, _ in got] != [i for i, _ in want] or any(
                abs(a - b) > 1e-4 for (_, a), (_, b) in zip(got, want, strict=True)
            ):
                return f"predictions {got} differ from {case.same_as}'s {want}"
    elif case.status == 202 and not (body.get("job_id") and r.headers.get("location") == f"/explain/{body['job_id']}"):
        return f"202 without a job: {body}"
    return None


def run_corpus(
    svc: RunningService, source: bytes, reference: dict, cases: list[BadInput] = CORPUS
) -> tuple[list[str], set[str]]:
    """Send every case (of ``cases``) once: (problems, ids of the jobs accepted)."""
    problems, jobs = [], set()
    for case in cases:
        r = send(svc, case, source)
        issue = problem(case, r, reference)
        if issue:
            problems.append(f"{case.name} [{case.kind}]: {issue}")
        elif case.status == 202:
            jobs.add(r.json()["job_id"])
    return problems, jobs


def rejected(svc: RunningService) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(svc.client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "shapserve_rejected_inputs_total":
                out[sample.labels["reason"]] = sample.value
    return out


@pytest.fixture(scope="module")
def reference(corpus_service: RunningService, cifar_jpeg: bytes) -> dict[str, list[tuple[int, float]]]:
    by_name = {case.name: case for case in CORPUS}
    out = {}
    for name in {case.same_as for case in CORPUS if case.same_as}:
        r = send(corpus_service, by_name[name], cifar_jpeg)
        assert r.status_code == 200, r.text
        out[name] = top(r)
    return out


def test_the_corpus_has_at_least_30_kinds():
    assert len(corpus.kinds()) >= 30, sorted(corpus.kinds())
    assert len(CORPUS) >= 100


@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
def test_each_bad_input_gets_its_expected_answer(corpus_service, cifar_jpeg, reference, case: BadInput):
    r = send(corpus_service, case, cifar_jpeg)
    issue = problem(case, r, reference)
    assert issue is None, f"{case.name} [{case.kind}]: {issue}"


def test_whole_corpus_repeatedly_then_still_serving_with_bounded_memory(
    corpus_service, cifar_jpeg, reference, explain_redis_url, corpus_queue
):
    svc = corpus_service
    by_name = {case.name: case for case in CORPUS}
    before = send(svc, by_name["upright_png"], cifar_jpeg)
    assert before.status_code == 200

    # Warm-up rounds: the allocator's arenas, thread pools, lazily imported codecs. Two of them:
    # the thread pool grows with the concurrency a round happens to reach, and each new thread's
    # malloc arena adds to RSS (seen once in a full suite: +15 MB in the measured rounds, under
    # the warm-up's own peak; 0.6 MB alone).
    for _ in range(2):
        problems, jobs = run_corpus(svc, cifar_jpeg, reference)
        assert not problems, "\n".join(problems)
    warm = svc.memory_kib()

    # Every refusal of a round is counted once under its code.
    counted_before = rejected(svc)
    expected = collections.Counter(case.code for case in CORPUS if case.code in COUNTED)
    time.sleep(0.2)
    for round_ in range(ROUNDS):
        problems, more_jobs = run_corpus(svc, cifar_jpeg, reference)
        assert not problems, "\n".join(problems)
        assert more_jobs == jobs  # identical explanation requests reuse their jobs
        if round_ == 0:
            counted_after = rejected(svc)
            delta = {code: counted_after.get(code, 0) - counted_before.get(code, 0) for code in COUNTED}
            assert delta == {code: float(expected.get(code, 0)) for code in COUNTED}
    time.sleep(0.5)
    after = svc.memory_kib()
    growth = {k: after[k] - warm[k] for k in after}
    assert growth["VmRSS"] < RSS_GROWTH_BOUND_KIB, (warm, after)
    assert growth["VmHWM"] < RSS_GROWTH_BOUND_KIB, (warm, after)

    # Still serving, and the same answer for the same picture.
    again = send(svc, by_name["upright_png"], cifar_jpeg)
    assert again.status_code == 200
    assert [i for i, _ in top(again)] == [i for i, _ in top(before)]
    assert [p for _, p in top(again)] == pytest.approx([p for _, p in top(before)], abs=1e-5)
    assert svc.client.get("/readyz").status_code == 200

    # Exactly the accepted jobs were queued: no refused request left one behind.
    import redis
    from rq import Queue

    conn = redis.Redis.from_url(explain_redis_url)
    try:
        assert set(Queue(corpus_queue, connection=conn).job_ids) == jobs
    finally:
        conn.close()
    print(f"\ncorpus: {len(CORPUS)} cases, {len(corpus.kinds())} kinds; RSS warm {warm}, "
          f"after {ROUNDS} rounds {after}")  # fmt: skip


def test_big_inputs_do_not_raise_the_peak_of_a_fresh_service(start_service, explain_redis_url, cifar_jpeg, reference):
    """VmHWM of a process that has never seen the big cases: read after two rounds of all the
    others (warm-up, the ~10 MB requests held included), then after the big ones, twice."""
    queue = f"bad-input-peak-{uuid.uuid4().hex[:8]}"
    svc = start_service(env=corpus_env(explain_redis_url, queue))
    try:
        small = [case for case in CORPUS if case.name not in BIG]
        big = [case for case in CORPUS if case.name in BIG]
        for _ in range(2):
            problems, _ = run_corpus(svc, cifar_jpeg, reference, small)
            assert not problems, "\n".join(problems)
        warm = svc.memory_kib()
        for _ in range(2):
            problems, _ = run_corpus(svc, cifar_jpeg, reference, big)
            assert not problems, "\n".join(problems)
        after = svc.memory_kib()
        assert after["VmHWM"] - warm["VmHWM"] < PEAK_GROWTH_BOUND_KIB, (warm, after)
        print(f"\npeak over the big cases: warm {warm}, after {after}")
    finally:
        svc.stop()
        purge_queue(explain_redis_url, queue)
