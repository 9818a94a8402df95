"""The explanation worker: the batched KernelSHAP against the plain shap pattern, segmentation
and background helpers, and real ``python -m worker`` subprocesses on the real Redis that
get SIGKILLed in the middle of a job, or count the jobs they run on their own metrics port."""

from __future__ import annotations

import io
import math
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from shapcore.background import summarize_background
from shapcore.explain.request import ExplainRequest
from shapcore.jobs.client import connect
from shapcore.jobs.queue import DEFAULT_JOB_SECONDS, JobRequest, get_queue, retry_after_estimate, submit
from shapcore.jobs.settings import ExplainSettings
from shapcore.model import to_source_size
from shapcore.registry import Registry
from shapcore.value import CoalitionModel
from tests.support.services import free_port
from tests.support.workers import assert_nontrivial, job_doc, job_image, wait_for
from worker.explain import ModelRuntime, explain_image
from worker.methods.kernel import kernel_shap, seeded_numpy
from worker.reference import plain_value_function
from worker.segmentation import area_weights, segment

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def loaded(smoke_model):
    registry, version = smoke_model
    torch.set_num_threads(1)
    return Registry(registry).load(version)


@pytest.fixture(scope="module")
def cat(cifar_jpeg: bytes) -> Image.Image:
    return Image.open(io.BytesIO(cifar_jpeg)).convert("RGB")


# -- the computation, in process ------------------------------------------------------------------


@pytest.mark.parametrize("background", [1, 3])
def test_batched_values_agree_with_the_plain_kernel_explainer(loaded, cat, background):
    """Same segments, background and samples: shap.KernelExplainer over the docs' per-coalition
    f gives the same values (all classes) as the batched worker path."""
    bg = summarize_background(loaded.background(), background)
    params = ExplainRequest(method="kernel", segments=10, samples=80, background=str(background), seed=7)
    result, seg, _ = explain_image(ModelRuntime(loaded.model, loaded.class_names, bg), params, cat, to_source_size(cat))
    m = seg.count

    import shap

    f = plain_value_function(loaded.model, np.asarray(cat), seg.labels, bg)
    with seeded_numpy(7):
        explainer = shap.KernelExplainer(f, np.zeros((1, m)))
        plain = np.asarray(explainer.shap_values(np.ones((1, m)), nsamples=80, l1_reg=False, silent=True))[0]
    ours = np.array([c["shap_values"] for c in result["classes"]]).T  # (M, classes)
    assert ours.shape == plain.shape == (m, len(loaded.class_names))
    assert_nontrivial(plain, atol=1e-5)
    assert_nontrivial(ours, atol=1e-5)
    np.testing.assert_allclose(ours, plain, atol=1e-5)
    np.testing.assert_allclose(
        [c["base_value"] for c in result["classes"]], np.asarray(explainer.expected_value), atol=1e-6
    )
    assert result["samples"] == 80
    assert result["model_evaluations"] == 80 * background + background + 1
    assert result["local_accuracy_residual"] < 1e-3
    assert result["max_local_accuracy_residual"] < 1e-3


def test_the_frozen_worker_model_explains_as_the_eager_one(smoke_model, loaded, cat):
    """What ``python -m worker`` runs (EXPLAIN_JIT, on by default: traced, frozen, optimised)
    gives the eager model's probabilities, and so the same SHAP values."""
    from worker.runtime import prepare_model

    registry, version = smoke_model
    frozen = prepare_model(Registry(registry).load(version), jit=True)[0].model
    assert isinstance(frozen, torch.jit.ScriptModule)
    x = torch.rand(37, 3, 32, 32)
    with torch.inference_mode():
        for batch in (x, x[:5], x[:1]):  # any batch size, as the last partial batch of a job
            got = torch.softmax(frozen(batch.contiguous(memory_format=torch.channels_last)), -1)
            np.testing.assert_allclose(got, torch.softmax(loaded.model(batch), -1), atol=1e-5)
    bg = summarize_background(loaded.background(), 2)
    params = ExplainRequest(segments=10, samples=80, background="kmeans:2", seed=3)
    ours, *_ = explain_image(ModelRuntime(frozen, loaded.class_names, bg), params, cat, to_source_size(cat))
    ref, *_ = explain_image(ModelRuntime(loaded.model, loaded.class_names, bg), params, cat, to_source_size(cat))
    assert_nontrivial([c["shap_values"] for c in ref["classes"]], atol=1e-5)
    np.testing.assert_allclose(
        [c["shap_values"] for c in ours["classes"]], [c["shap_values"] for c in ref["classes"]], atol=1e-5
    )
    assert ours["local_accuracy_residual"] < 1e-3


def test_exhaustive_small_case_is_exact_shapley(loaded, cat):
    """With every coalition enumerated (M small), KernelSHAP equals the exact Shapley values."""
    from itertools import combinations
    from math import factorial

    bg = summarize_background(loaded.background(), 1)
    seg = segment(cat, 4)
    m = seg.count
    assert 2 <= m <= 6
    f = CoalitionModel(loaded.model, to_source_size(cat), seg.weights, bg)
    out = kernel_shap(f, m, samples=1000, seed=0)
    target = int(np.argmax(out["fx"]))

    def v(s: tuple[int, ...]) -> float:
        z = np.zeros((1, m))
        z[0, list(s)] = 1
        return float(f(z)[0, target])

    exact = np.zeros(m)
    for j in range(m):
        others = [i for i in range(m) if i != j]
        for size in range(m):
            w = factorial(size) * factorial(m - size - 1) / factorial(m)
            for s in combinations(others, size):
                exact[j] += w * (v((*s, j)) - v(s))
    assert_nontrivial(exact, atol=1e-5)
    np.testing.assert_allclose(out["phi"][:, target], exact, atol=1e-5)


def test_segmentation_at_the_upload_resolution(cat):
    seg = segment(cat, 50)
    assert seg.labels.shape == (32, 32)
    assert 40 <= seg.count <= 65  # SLIC's count is approximate; we ask again until close
    assert set(np.unique(seg.weights)) <= {0.0, 1.0}  # 32x32: plain 0/1 masks
    big = cat.resize((320, 200), Image.Resampling.BICUBIC)
    seg_big = segment(big, 50)
    assert seg_big.labels.shape == (200, 320)  # segmented at its own size, not at 32x32
    np.testing.assert_allclose(seg_big.weights.sum(axis=0), 1.0, atol=1e-6)  # area shares per model pixel
    huge = cat.resize((1200, 900), Image.Resampling.BICUBIC)
    assert max(segment(huge, 20, max_side=512).labels.shape) == 512


def test_area_weights_of_a_half_split_image():
    labels = np.zeros((64, 64), dtype=np.int32)
    labels[:, 33:] = 1  # the boundary cuts model column 16 in half
    w = area_weights(labels, 32).reshape(2, 32, 32)
    assert w[0, 0, 15] == 1.0 and w[1, 0, 17] == 1.0
    assert w[0, 0, 16] == pytest.approx(0.5) and w[1, 0, 16] == pytest.approx(0.5)


def test_background_summaries(loaded):
    stored = loaded.background()
    assert stored.shape[0] == 100
    one = summarize_background(stored, 1)
    torch.testing.assert_close(one.images[0], stored.float().mean(0) / 255.0)
    full = summarize_background(stored, 100)
    torch.testing.assert_close(full.images, stored.float() / 255.0)
    assert full.weights.sum().item() == pytest.approx(1.0)
    five = summarize_background(stored, 5)
    assert 1 <= len(five) <= 5 and five.weights.sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        summarize_background(stored, 101)


# -- real workers on the real Redis ---------------------------------------------------------------------


def _request(loaded, image: bytes, samples: int, seed: int = 0) -> JobRequest:
    return JobRequest.of(
        image=job_image(image),
        model_version=loaded.version,
        segments=50,
        samples=samples,
        background="mean",
        seed=seed,
        target=None,
    )


def _settings(url: str, queue: str, **extra) -> ExplainSettings:
    return ExplainSettings(redis_url=url, explain_queue=queue, **extra)


def _started_with_progress(conn, settings, job_id):
    doc = job_doc(conn, settings, job_id)
    return doc if doc["status"] == "started" and doc["progress"] > 0.05 else None


def test_sigkill_of_a_worker_mid_job_retries_it_on_another(
    smoke_model, loaded, cifar_jpeg, start_worker, explain_redis_url
):
    registry: Path = smoke_model[0]
    queue = "explain-test-kill-retry"
    settings = _settings(explain_redis_url, queue, explain_retries=1)
    conn = connect(explain_redis_url, 2.0)
    first = start_worker(registry, env={"EXPLAIN_QUEUE": queue, "EXPLAIN_RETRIES": "1"})
    job, created = submit(conn, settings, _request(loaded, cifar_jpeg, samples=3000, seed=11))
    assert created
    wait_for(lambda: _started_with_progress(conn, settings, job.id), 120, "the job to start")
    horses = first.horses()
    assert len(horses) == 1, first.log_tail()

    first.kill()  # SIGKILL, mid-job
    wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in horses), 10, "the horse to die with its worker")
    doc = wait_for(
        lambda: (d := job_doc(conn, settings, job.id))["status"] == "queued" and d,
        60,
        "the abandoned job to be requeued",
    )
    assert "died" in doc["error"] and "retried" in doc["error"], doc

    second = start_worker(registry, env={"EXPLAIN_QUEUE": queue})
    doc = wait_for(
        lambda: (d := job_doc(conn, settings, job.id))["status"] in ("finished", "failed") and d,
        300,
        "the retried job to finish",
        interval=1.0,
    )
    assert doc["status"] == "finished", (doc, second.log_tail())
    assert doc["attempts"] == 2
    assert doc["result"]["local_accuracy_residual"] < 1e-3
    second.stop()


def test_sigkill_without_retries_left_fails_with_the_reason(
    smoke_model, loaded, cifar_jpeg, start_worker, explain_redis_url
):
    registry: Path = smoke_model[0]
    queue = "explain-test-kill-fail"
    settings = _settings(explain_redis_url, queue, explain_retries=0)
    conn = connect(explain_redis_url, 2.0)
    worker = start_worker(registry, env={"EXPLAIN_QUEUE": queue})
    job, _ = submit(conn, settings, _request(loaded, cifar_jpeg, samples=20_000, seed=12))
    wait_for(lambda: _started_with_progress(conn, settings, job.id), 120, "the job to start")
    worker.kill()
    doc = wait_for(lambda: (d := job_doc(conn, settings, job.id))["status"] == "failed" and d, 60, "the job to fail")
    assert "worker running this job died" in doc["error"], doc
    assert doc["result"] is None


def test_sigkill_of_the_work_horse_is_seen_at_once(smoke_model, loaded, cifar_jpeg, start_worker, explain_redis_url):
    """The OOM killer's choice: the horse (the biggest process). The parent fails the job at once."""
    import os
    import signal

    registry: Path = smoke_model[0]
    queue = "explain-test-kill-horse"
    settings = _settings(explain_redis_url, queue, explain_retries=0)
    conn = connect(explain_redis_url, 2.0)
    worker = start_worker(registry, env={"EXPLAIN_QUEUE": queue})
    job, _ = submit(conn, settings, _request(loaded, cifar_jpeg, samples=20_000, seed=13))
    wait_for(lambda: _started_with_progress(conn, settings, job.id), 120, "the job to start")
    (horse,) = worker.horses()
    os.kill(horse, signal.SIGKILL)
    doc = wait_for(lambda: (d := job_doc(conn, settings, job.id))["status"] == "failed" and d, 30, "the job to fail")
    assert "signal 9" in doc["error"], doc
    assert worker.proc.poll() is None  # the worker itself lives on and takes the next job
    small, _ = submit(conn, settings, _request(loaded, cifar_jpeg, samples=400, seed=14))
    doc = wait_for(
        lambda: (d := job_doc(conn, settings, small.id))["status"] == "finished" and d, 120, "the next job"
    )
    assert doc["result"]["samples"] == 400  # over the floor of 4 x the superpixels SLIC made


# -- one count per job, on the worker's own endpoint ---------------------------------------------------


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    """The worker's /metrics: {(sample name, sorted labels): value}."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _jobs(samples: dict, status: str) -> float:
    return samples[("shapserve_worker_jobs_total", (("status", status),))]


def test_each_job_is_counted_once_by_its_worker_and_sets_retry_after(
    smoke_model, loaded, cifar_jpeg, start_worker, explain_redis_url
):
    """N finished jobs and one failed job through a real worker: its own counters rise by exactly
    N and 1 (the one source of job counts); Retry-After follows those jobs' real durations."""
    from rq.job import Job

    registry: Path = smoke_model[0]
    queue_name = "explain-test-counted-once"
    settings = _settings(explain_redis_url, queue_name, explain_retries=0)
    conn = connect(explain_redis_url, 2.0)
    queue = get_queue(conn, settings)
    port = free_port()
    start_worker(registry, env={"EXPLAIN_QUEUE": queue_name, "EXPLAIN_METRICS_PORT": str(port),
                                "EXPLAIN_METRICS_HOST": "127.0.0.1"})  # fmt: skip
    # No job has finished on this queue: the estimate assumes the default per job (one worker).
    assert retry_after_estimate(conn, queue, 3) == math.ceil(3 * DEFAULT_JOB_SECONDS)
    before = _scrape(port)

    n = 3
    finished = [submit(conn, settings, _request(loaded, cifar_jpeg, samples=50, seed=30 + i))[0] for i in range(n)]
    unknown = JobRequest.of(job_image(cifar_jpeg), "20000101-000000-000000", segments=10, samples=30, background="mean",
                         seed=0,
                         target=None)  # fmt: skip
    failed, _ = submit(conn, settings, unknown)  # last in the queue: one worker runs the jobs in order

    def failure_counted() -> dict | None:
        samples = _scrape(port)
        return samples if _jobs(samples, "failed") > _jobs(before, "failed") else None

    after = wait_for(failure_counted, 300, "the worker to count the failed job", interval=0.5)
    results = [job_doc(conn, settings, job.id) for job in finished]
    assert [r["status"] for r in results] == ["finished"] * n, results
    assert job_doc(conn, settings, failed.id)["status"] == "failed"

    def rise(name: str, labels: tuple = ()) -> float:
        return after[(name, labels)] - before[(name, labels)]

    assert _jobs(after, "finished") - _jobs(before, "finished") == n
    assert _jobs(after, "failed") - _jobs(before, "failed") == 1
    assert _jobs(after, "retried") - _jobs(before, "retried") == 0
    assert rise("shapserve_worker_job_duration_seconds_count") == n + 1
    evaluations = sum(r["result"]["model_evaluations"] for r in results)
    assert evaluations > 0 and rise("shapserve_worker_model_evaluations_total") == evaluations
    forward = sum(r["result"]["timings_s"]["model_forward"] for r in results)
    assert forward > 0 and rise("shapserve_worker_model_forward_seconds_total") == pytest.approx(forward)

    # Retry-After: depth × the mean compute time of the finished jobs (RQ's timestamps) / 1 worker.
    jobs = Job.fetch_many([job.id for job in finished], connection=conn)
    mean = sum((j.ended_at - j.started_at).total_seconds() for j in jobs) / n
    depth = 40
    assert retry_after_estimate(conn, queue, depth) == min(3600, max(1, math.ceil(depth * mean)))


def test_an_explanation_names_the_runtime_that_ran(smoke_model, loaded, cifar_jpeg, start_worker, explain_redis_url,
                                                   tmp_path):  # fmt: skip
    """A forking worker asked for the int8 runtime (EXPLAIN_RUNTIME=int8: the ONNX export quantised
    once at load, in a copy of the registry, then run by ONNX Runtime in the work horse): the
    result says which runtime and precision ran; named, so neither speed-up nor agreement was measured."""
    pytest.importorskip("onnxruntime", reason="the `runtimes` extra")
    registry = tmp_path / "registry"
    shutil.copytree(smoke_model[0] / loaded.version, registry / loaded.version)
    queue = "explain-test-runtime"
    settings = _settings(explain_redis_url, queue)
    conn = connect(explain_redis_url, 2.0)
    worker = start_worker(registry, env={"EXPLAIN_QUEUE": queue, "EXPLAIN_RUNTIME": "int8"}, wait=False)
    worker.wait_listening(timeout=420)  # the export and its quantisation first: seconds, minutes on a busy machine
    assert (registry / loaded.version / "runtimes" / "model-int8.onnx").is_file(), worker.log_tail()
    job, _ = submit(conn, settings, _request(loaded, cifar_jpeg, samples=400, seed=3))
    doc = wait_for(lambda: (d := job_doc(conn, settings, job.id))["status"] in ("finished", "failed") and d,
                   300, "the job to finish", interval=0.5)  # fmt: skip
    worker.stop()
    assert doc["status"] == "finished", (doc, worker.log_tail())
    result = doc["result"]
    assert result["runtime"] == {"name": "int8", "precision": "int8", "speedup": None, "agreement": None}
    assert result["precision"] == "int8" and result["local_accuracy_residual"] < 1e-3
