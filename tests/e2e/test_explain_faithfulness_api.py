"""GET /explain/{id}/faithfulness.png and the worker's AUC histograms, over real HTTP.

``python -m service`` and ``python -m worker`` subprocesses on the real Redis (the explanation
tests' database), the smoke checkpoint, a real CIFAR-10 JPEG. The job is posted before the
worker starts, so the same job is seen queued (409) and then finished (a PNG). The renderer is
also checked alone, from a result dict.
"""

from __future__ import annotations

import io
import uuid

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.support.services import free_port
from tests.support.services import image_file as files
from tests.support.workers import job_image, wait_finished

pytestmark = pytest.mark.timeout(600)

QUEUE = "explain-faithfulness"
METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def api(start_service, explain_redis_url):
    svc = start_service(env={"REDIS_URL": explain_redis_url, "EXPLAIN_QUEUE": QUEUE})
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def job(api, start_worker, service_registry, cifar_jpeg) -> dict:
    """One small explanation posted while no worker listens (its PNG answered then), then run
    by a fresh worker with its own metrics port."""
    client = api.client
    post = client.post("/explain", files=files(cifar_jpeg), data={"segments": "12", "samples": "60", "seed": "5"})
    assert post.status_code == 202, post.text
    early = client.get(post.json()["faithfulness_url"])
    worker = start_worker(service_registry, env={"EXPLAIN_QUEUE": QUEUE, "EXPLAIN_METRICS_PORT": str(METRICS_PORT),
                                                 "EXPLAIN_METRICS_HOST": "127.0.0.1"})  # fmt: skip
    doc = wait_finished(client, post.headers["location"])
    assert doc["status"] == "finished", (doc, worker.log_tail())
    yield {"post": post.json(), "early": early, "status": doc}
    worker.stop()


def test_the_curves_of_a_finished_job_as_a_png(api, job, explain_redis_url):
    body, result = job["post"], job["status"]["result"]
    assert body["faithfulness_url"] == f"/explain/{body['job_id']}/faithfulness.png"
    faith = result["faithfulness"]
    m = result["segments"]["count"]
    assert faith["steps"] == m and faith["random_orders"] == 3  # 12 asked for: one superpixel a step
    assert faith["curves"]["deletion"][0] == pytest.approx(result["target"]["probability"])
    for key in ("deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc"):
        assert 0.0 <= faith[key] <= 1.0, faith
    assert result["faithfulness_evaluations"] > 0

    r = api.client.get(body["faithfulness_url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    Image.open(io.BytesIO(r.content)).verify()
    width, height = Image.open(io.BytesIO(r.content)).size
    assert width >= 800 and height >= 400  # two panels
    import redis

    from shapcore.jobs.keys import png_key

    conn = redis.Redis.from_url(explain_redis_url)
    assert conn.get(png_key(body["job_id"], "faithfulness")) == r.content  # drawn once, then cached
    assert conn.ttl(png_key(body["job_id"], "faithfulness")) > 60
    assert api.client.get(body["faithfulness_url"]).content == r.content
    conn.close()


def test_409_until_finished_or_when_failed_and_404_when_unknown(api, job, cifar_jpeg, explain_redis_url):
    early = job["early"]
    assert early.status_code == 409 and early.json()["error"]["code"] == "not_ready", early.text
    assert int(early.headers["retry-after"]) >= 1

    from shapcore.jobs.client import connect
    from shapcore.jobs.queue import JobRequest, submit
    from shapcore.jobs.settings import ExplainSettings

    settings = ExplainSettings(redis_url=explain_redis_url, explain_queue=QUEUE, explain_retries=0)
    unknown_version = JobRequest.of(job_image(cifar_jpeg), "20000101-000000-000000", segments=10, samples=30,
                                 background="mean", seed=0, target=None)  # fmt: skip
    failed, _ = submit(connect(explain_redis_url, 2.0), settings, unknown_version)
    doc = wait_finished(api.client, f"/explain/{failed.id}")
    assert doc["status"] == "failed", doc
    r = api.client.get(f"/explain/{failed.id}/faithfulness.png")
    assert r.status_code == 409 and r.json()["error"]["code"] == "explanation_failed"
    assert "unknown version" in r.json()["error"]["message"]

    for path in (f"/explain/{uuid.uuid4()}/faithfulness.png", "/explain/not-a-uuid/faithfulness.png"):
        r = api.client.get(path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path


def test_the_worker_observes_both_aucs_of_its_finished_job(job):
    """A fresh worker that finished this one job: each histogram holds exactly its AUC."""
    from worker.metrics import AUC_BUCKETS

    text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    faith = job["status"]["result"]["faithfulness"]
    method = job["status"]["result"]["method"]
    for curve in ("deletion", "insertion"):
        name = f"shapserve_worker_{curve}_auc"
        assert samples[(f"{name}_count", (("method", method),))] == 1
        assert samples[(f"{name}_sum", (("method", method),))] == pytest.approx(faith[f"{curve}_auc"])
        le = next(b for b in AUC_BUCKETS if faith[f"{curve}_auc"] <= b)  # the AUC's bucket holds it, once
        assert samples[(f"{name}_bucket", (("le", str(le)), ("method", method)))] == 1
        assert samples[(f"{name}_count", (("method", "gradcam"),))] == 0  # every method's series exists


def test_the_renderer_alone_from_a_result_dict():
    """Drawn from the result alone: each panel plots its curve and its baseline, the legend
    gives their AUCs; no curves, no PNG."""
    from service.explain_faithfulness_plot import faithfulness_figure, render_faithfulness

    fraction = np.linspace(0, 1, 11)
    falling, rising = np.exp(-5 * fraction), 1 - np.exp(-5 * fraction)

    def result(deletion: np.ndarray, insertion: np.ndarray) -> dict:
        curves = {"fraction": fraction, "deletion": deletion, "insertion": insertion,
                  "random_deletion": 1 - fraction, "random_insertion": fraction}  # fmt: skip
        aucs = {f"{k}_auc": float(np.trapezoid(v, fraction)) for k, v in curves.items() if k != "fraction"}
        faith = {**aucs, "steps": 10, "random_orders": 3, "curves": {k: v.tolist() for k, v in curves.items()}}
        return {"method": "kernel", "target": {"index": 3, "label": "cat", "probability": 0.9}, "faithfulness": faith}

    good = result(falling, rising)
    image = Image.open(io.BytesIO(render_faithfulness(good)))
    assert image.format == "PNG" and image.size[0] >= 800 and image.size[1] >= 400
    faith = good["faithfulness"]
    axes = faithfulness_figure(good).axes
    for ax, kind in zip(axes, ("deletion", "insertion"), strict=True):
        curve, baseline = ax.lines[0], ax.lines[1]
        np.testing.assert_allclose(curve.get_xdata(), fraction)
        np.testing.assert_allclose(curve.get_ydata(), faith["curves"][kind])
        np.testing.assert_allclose(baseline.get_ydata(), faith["curves"][f"random_{kind}"])
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend == [f"explanation (AUC {faith[f'{kind}_auc']:.3f})",
                          f"random order (AUC {faith[f'random_{kind}_auc']:.3f})"]  # fmt: skip
    assert "kernel" in axes[0].figure.get_suptitle() and "cat" in axes[0].figure.get_suptitle()
    with pytest.raises(KeyError):
        render_faithfulness({"method": "kernel", "target": {"label": "cat", "probability": 0.9}})
