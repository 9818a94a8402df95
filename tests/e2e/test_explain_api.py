"""Explanations over real HTTP: ``python -m service`` and ``python -m worker`` subprocesses on
the real Redis (database 14), a real smoke checkpoint, a real CIFAR-10 JPEG."""

from __future__ import annotations

import io
import re
import uuid

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.support.services import free_port, metric
from tests.support.services import image_file as files
from tests.support.workers import assert_nontrivial, job_image, wait_finished

pytestmark = pytest.mark.timeout(600)

SMALL = {"segments": "12", "samples": "60"}


@pytest.fixture(scope="module")
def explain_service(start_service, explain_redis_url, service_registry):
    """The service on the explanation tests' Redis database, with a worker on its queue."""
    svc = start_service(env={"REDIS_URL": explain_redis_url, "EXPLAIN_QUEUE": "explain-api"})
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def api_worker(start_worker, service_registry, explain_service):
    worker = start_worker(service_registry, env={"EXPLAIN_QUEUE": "explain-api"})
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def finished(explain_service, api_worker, cifar_jpeg) -> dict:
    """One small explanation, run to the end: (POST answer, final status document)."""
    client = explain_service.client
    r = client.post("/explain", files=files(cifar_jpeg), data={"segments": "12", "samples": "60", "seed": "3"})
    assert r.status_code == 202, r.text
    doc = wait_finished(client, r.headers["location"])
    assert doc["status"] == "finished", (doc, api_worker.log_tail())
    return {"post": r, "status": doc}


# -- the round trip ---------------------------------------------------------------------------------


def test_round_trip_to_a_valid_png(explain_service, finished, smoke_model):
    client = explain_service.client
    post = finished["post"]
    body = post.json()
    job_id = body["job_id"]
    assert str(uuid.UUID(job_id)) == job_id
    assert post.headers["location"] == body["status_url"] == f"/explain/{job_id}"
    assert body["heatmap_url"] == f"/explain/{job_id}/heatmap.png"
    assert body["model_version"] == smoke_model[1]

    doc = finished["status"]
    assert set(doc) >= {"job_id", "status", "queue_position", "progress", "result", "error"}
    assert doc["progress"] == 1.0 and doc["error"] is None and doc["queue_position"] is None
    result = doc["result"]
    assert result["model_version"] == smoke_model[1]
    m = result["segments"]["count"]
    assert len(result["shap_values"]) == m and 6 <= m <= 20
    assert result["target"] == result["predicted"]  # default target: the top-1 prediction
    assert 0.0 <= result["target"]["probability"] <= 1.0
    assert result["samples"] == 60 and result["model_evaluations"] == 62
    assert result["duration_s"] > 0
    residual = abs(result["base_value"] + sum(result["shap_values"]) - result["target"]["probability"])
    assert result["local_accuracy_residual"] < 1e-3 and residual < 1e-3
    assert len(result["classes"]) == 10

    png = client.get(body["heatmap_url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(png.content))
    image.verify()
    width, height = Image.open(io.BytesIO(png.content)).size
    assert width >= 2 * 256 and height >= 256  # the input and the target panel, 256+ px each

    every = client.get(body["heatmap_url"], params={"classes": "all"})
    assert every.status_code == 200
    assert Image.open(io.BytesIO(every.content)).size[0] >= 11 * 256
    assert client.get(body["heatmap_url"], params={"classes": "cat,dog"}).status_code == 200
    bad = client.get(body["heatmap_url"], params={"classes": "zebra"})
    assert bad.status_code == 422 and "zebra" in bad.json()["error"]["message"]


def test_a_finished_status_matches_its_published_schema(explain_service, finished):
    """GET /explain/{id} publishes its 200 body in /openapi.json, naming the result's fields; a
    real finished document validates against it, and a corrupted one does not."""
    import jsonschema_rs

    spec = explain_service.client.get("/openapi.json").json()
    get = spec["paths"]["/explain/{job_id}"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    validator = jsonschema_rs.Draft202012Validator({**get, "components": spec["components"]})
    validator.validate(finished["status"])
    schemas = spec["components"]["schemas"]
    named = set(schemas["ExplainResult"]["properties"])
    assert {"shap_values", "segments", "classes", "base_value", "target", "standard_errors"} <= named
    assert {"segments_url", "heatmap_url", "result", "status"} <= set(schemas["JobStatus"]["properties"])
    with pytest.raises(jsonschema_rs.ValidationError):
        validator.validate({**finished["status"], "progress": "half"})
    broken = {**finished["status"]["result"], "shap_values": "none"}
    with pytest.raises(jsonschema_rs.ValidationError):
        validator.validate({**finished["status"], "result": broken})


def test_the_players_map_reconstructs_the_heatmaps_sign_pattern(explain_service, finished):
    """segments.png: a 16-bit map of the explained picture's size whose values 0..count-1 index
    ``shap_values``; reading the target panel of the heatmap through it, each strong player's
    mean colour is red where its value is positive and blue where it is negative."""
    from shapcore.heatmap import panel_box

    client = explain_service.client
    body, doc = finished["post"].json(), finished["status"]
    result = doc["result"]
    assert body["segments_url"] == doc["segments_url"] == f"/explain/{body['job_id']}/segments.png"
    r = client.get(body["segments_url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(r.content))
    assert picture.mode == "I;16"
    players = np.asarray(picture).astype(np.int64)
    height, width, m = result["segments"]["height"], result["segments"]["width"], result["segments"]["count"]
    assert players.shape == (height, width)
    assert set(np.unique(players).tolist()) == set(range(m))

    heat = np.asarray(Image.open(io.BytesIO(client.get(body["heatmap_url"]).content)).convert("RGB"), dtype=np.int64)
    left, top, w, h = panel_box(1, height, width)
    panel = heat[top : top + h, left : left + w]
    owner = players[(np.arange(h) * height) // h][:, (np.arange(w) * width) // w]  # the player under each pixel
    redness = panel[..., 0] - panel[..., 2]
    values = np.asarray(result["shap_values"])
    strong = np.flatnonzero(np.abs(values) > 0.2 * np.abs(values).max())
    assert len(strong) >= 2
    colours = [float(redness[owner == i].mean()) for i in strong]
    assert [np.sign(c) for c in colours] == [np.sign(values[i]) for i in strong], (colours, values[strong])


def test_values_agree_with_the_plain_kernel_explainer(explain_service, api_worker, cifar_jpeg, service_registry):
    """The served values against shap.KernelExplainer used the plain way (the docs' per-coalition
    f) on the same segments, background and samples, recomputed here in the test process."""
    import shap
    import torch

    from shapcore.background import summarize_background
    from shapcore.registry import Registry
    from worker.methods.kernel import seeded_numpy
    from worker.reference import plain_value_function
    from worker.segmentation import segment

    client = explain_service.client
    r = client.post("/explain", files=files(cifar_jpeg), data={"method": "kernel", "segments": "8", "samples": "40",
                                                               "background": "3", "seed": "21"})  # fmt: skip
    assert r.status_code == 202, r.text
    doc = wait_finished(client, r.headers["location"])
    assert doc["status"] == "finished", doc
    result = doc["result"]

    torch.set_num_threads(1)
    loaded = Registry(service_registry).load(result["model_version"])
    image = Image.open(io.BytesIO(cifar_jpeg)).convert("RGB")
    seg = segment(image, 8)
    assert seg.count == result["segments"]["count"]
    bg = summarize_background(loaded.background(), 3)
    f = plain_value_function(loaded.model, np.asarray(image), seg.labels, bg)
    with seeded_numpy(21):
        explainer = shap.KernelExplainer(f, np.zeros((1, seg.count)))
        plain = np.asarray(explainer.shap_values(np.ones((1, seg.count)), nsamples=40, l1_reg=False, silent=True))[0]
    served = np.array([c["shap_values"] for c in result["classes"]]).T
    assert_nontrivial(plain, atol=1e-5)
    assert_nontrivial(served, atol=1e-5)
    np.testing.assert_allclose(served, plain, atol=1e-5)
    target = result["target"]["index"]
    assert result["base_value"] == pytest.approx(float(np.asarray(explainer.expected_value)[target]), abs=1e-6)


@pytest.mark.parametrize("method", ["gradcam", "integrated_gradients"])
def test_a_gradient_method_runs_in_the_real_worker(explain_service, api_worker, cifar_jpeg, method):
    """The worker keeps an autograd copy of the model for the gradient methods (the frozen
    TorchScript one has none): the job finishes in the method's shape, its heatmap draws the
    pixel map, and the background is named in the result."""
    client = explain_service.client
    fields = {"segments": "12", "method": method, "background": "blur"}
    r = client.post("/explain", files=files(cifar_jpeg), data=fields)
    assert r.status_code == 202, r.text
    assert r.json()["parameters"]["method"] == method and r.json()["parameters"]["background"] == "blur"
    doc = wait_finished(client, r.headers["location"])
    assert doc["status"] == "finished", (doc, api_worker.log_tail())
    result = doc["result"]
    assert result["method"] == method and result["background"] == "blur" and result["background_images"] == 1
    assert result["standard_errors"] is None and isinstance(result["convergence"]["converged"], bool)
    assert result["faithfulness"]["steps"] >= 1
    png = client.get(r.json()["heatmap_url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    curves = client.get(r.json()["faithfulness_url"])
    assert curves.status_code == 200 and curves.headers["content-type"] == "image/png"


def test_kernel_over_the_grid_players_of_the_fast_explainer(explain_service, api_worker, cifar_jpeg):
    """players=grid: KernelSHAP over the 64 cells method=fast values, so the two compare value
    for value; segments is ignored, the heatmap draws the cells."""
    client = explain_service.client
    r = client.post("/explain", files=files(cifar_jpeg), data={"players": "grid", "samples": "300", "segments": "9"})
    assert r.status_code == 202, r.text
    assert r.json()["parameters"]["players"] == "grid" and r.json()["parameters"]["segments"] == 64
    doc = wait_finished(client, r.headers["location"])
    assert doc["status"] == "finished", (doc, api_worker.log_tail())
    result = doc["result"]
    assert result["players"] == "grid" and result["segments"]["count"] == 64 and len(result["shap_values"]) == 64
    assert result["local_accuracy_residual"] < 1e-6
    png = client.get(r.json()["heatmap_url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"


def test_duplicate_submission_reuses_its_job(explain_service, finished, cifar_jpeg, explain_redis_url):
    client = explain_service.client
    first = finished["post"].json()
    again = client.post("/explain", files=files(cifar_jpeg), data={"segments": "12", "samples": "60", "seed": "3"})
    assert again.status_code == 200  # already finished: answered at once, nothing recomputed
    assert again.json()["job_id"] == first["job_id"] and again.json()["deduplicated"] is True
    # the same picture in another encoding (lossless PNG of the decoded JPEG) is the same request
    png = io.BytesIO()
    Image.open(io.BytesIO(cifar_jpeg)).convert("RGB").save(png, "PNG")
    as_png = client.post("/explain", files={"file": ("a.png", png.getvalue(), "image/png")},
                         data={"segments": "12", "samples": "60", "seed": "3"})  # fmt: skip
    assert as_png.json()["job_id"] == first["job_id"]
    other_seed = client.post("/explain", files=files(cifar_jpeg), data={"segments": "12", "samples": "60", "seed": "4"})
    assert other_seed.status_code == 202 and other_seed.json()["job_id"] != first["job_id"]

    import redis

    conn = redis.Redis.from_url(explain_redis_url)
    jobs = [k for k in conn.scan_iter("rq:job:*") if k.count(b":") == 2]
    ids = {k.decode().rsplit(":", 1)[1] for k in jobs}
    assert first["job_id"] in ids


def test_duplicate_of_a_queued_job_is_the_same_job(own_service, explain_redis_url, cifar_jpeg):
    """No worker listens on this queue: jobs stay queued; a duplicate gets the queued one."""
    svc = own_service(env={"REDIS_URL": explain_redis_url, "EXPLAIN_QUEUE": f"explain-idle-{uuid.uuid4().hex[:6]}",
                             "EXPLAIN_MAX_QUEUE_DEPTH": "2"})  # fmt: skip
    client = svc.client
    a = client.post("/explain", files=files(cifar_jpeg), data=SMALL)
    b = client.post("/explain", files=files(cifar_jpeg), data=SMALL)
    assert a.status_code == b.status_code == 202
    assert a.json()["job_id"] == b.json()["job_id"] and b.json()["deduplicated"] is True

    status = client.get(a.headers["location"])
    assert status.status_code == 200
    doc = status.json()
    assert doc["status"] == "queued" and doc["queue_position"] == 1 and doc["result"] is None
    assert int(status.headers["retry-after"]) >= 1

    early = client.get(a.json()["heatmap_url"])
    assert early.status_code == 409 and early.json()["error"]["code"] == "not_ready"
    assert int(early.headers["retry-after"]) >= 1

    # queue depth limit (2): a second distinct job fits, a third is refused with Retry-After
    assert client.post("/explain", files=files(cifar_jpeg), data={**SMALL, "seed": "1"}).status_code == 202
    full = client.post("/explain", files=files(cifar_jpeg), data={**SMALL, "seed": "2"})
    assert full.status_code == 429, full.text
    assert full.json()["error"]["code"] == "queue_full" and int(full.headers["retry-after"]) >= 1
    # ...but a duplicate of a queued job is still answered: it adds no work
    assert client.post("/explain", files=files(cifar_jpeg), data=SMALL).status_code == 202
    svc.stop()


# -- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"target": "zebra"}, "unknown target class 'zebra'"),
        ({"target": "10"}, "index from 0 to 9"),
        ({"segments": "1"}, "segments must be from 2 to 200"),
        ({"segments": "many"}, "segments must be an integer from 2 to 200"),
        ({"samples": "5"}, "samples must be from 20 to 20000"),
        ({"background": "0"}, "background must be from 1 to 100"),
        ({"background": "101"}, "background must be from 1 to 100"),
        ({"seed": "-1"}, "seed must be from 0 to"),
        ({"samples": "20000", "background": "100"}, "over the limit"),
        ({"samples": "20000", "background": "train:26"}, "20000 x 26 = 520000 model evaluations"),
        ({"segments": "60", "samples": "200"}, "adjusted needs at least 240 (4 x segments"),
        ({"segments": "60", "samples": "200", "method": "partition"}, "partition needs at least 240"),
        ({"method": "lime"},
         "method must be one of kernel, leverage, adjusted, partition, gradcam, integrated_gradients, fast"),
        ({"players": "hexagons"}, "players must be one of slic, grid"),
        ({"players": "grid", "samples": "200"}, "adjusted needs at least 256 (4 x segments"),
        ({"method": "fast", "players": "slic"}, "method=fast values the grid layout's players"),
        ({"background": "sky"}, "background must be one of mean, blur, train:K or kmeans:K"),
        ({"background": "train:0"}, "background must be from 1 to 100 images (got 0)"),
        ({"background": "kmeans:101"}, "background must be from 1 to 100 images (got 101)"),
    ],
)
def test_out_of_range_parameters_name_the_allowed_range(explain_service, cifar_jpeg, fields, fragment):
    r = explain_service.client.post("/explain", files=files(cifar_jpeg), data=fields)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_parameter"
    assert fragment in r.json()["error"]["message"]


def test_target_by_label_or_index(explain_service, api_worker, cifar_jpeg):
    client = explain_service.client
    by_label = client.post("/explain", files=files(cifar_jpeg), data={**SMALL, "target": "Dog"})
    by_index = client.post("/explain", files=files(cifar_jpeg), data={**SMALL, "target": "5"})
    assert by_label.status_code == 202 and by_label.json()["parameters"]["target"] == 5
    assert by_index.json()["job_id"] == by_label.json()["job_id"]  # the same normalised request
    doc = wait_finished(client, by_label.headers["location"])
    assert doc["result"]["target"]["label"] == "dog"


def test_parameters_in_the_query_string_are_refused(explain_service, cifar_jpeg):
    """They are form fields: a query-string value would otherwise be silently ignored."""
    r = explain_service.client.post("/explain", files=files(cifar_jpeg), data={"segments": "10"},
                                    params={"segments": "20"})  # fmt: skip
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameter"
    assert "segments in the query string" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("make", "status", "code"),
    [
        (lambda jpeg: {"files": {"file": ("a.txt", b"hello, not an image", "text/plain")}}, 415, "not_an_image"),
        (lambda jpeg: {"files": {"file": ("cut.jpg", jpeg[: len(jpeg) // 2], "image/jpeg")}}, 422, "corrupt_image"),
        (lambda jpeg: {"files": {"image": ("a.jpg", jpeg, "image/jpeg")}}, 422, "missing_file"),
        (lambda jpeg: {"files": {"file": ("a.jpg", b"", "image/jpeg")}}, 422, "empty_file"),
        (lambda jpeg: {"content": b"raw", "headers": {"content-type": "image/jpeg"}}, 415, "unsupported_media_type"),
        (lambda jpeg: {"files": [("file", ("a.jpg", jpeg, "image/jpeg"))] * 2}, 422, "too_many_files"),
    ],
)
def test_everything_predict_rejects_is_rejected(explain_service, cifar_jpeg, make, status, code):
    r = explain_service.client.post("/explain", **make(cifar_jpeg))
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert explain_service.client.post("/predict", **make(cifar_jpeg)).status_code == (
        200 if code == "too_many_files" else status
    )  # /predict takes several files; every other refusal is the same


def test_unknown_job_is_404(explain_service):
    client = explain_service.client
    for path in (f"/explain/{uuid.uuid4()}", f"/explain/{uuid.uuid4()}/heatmap.png", "/explain/not-a-uuid"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path


# -- faults --------------------------------------------------------------------------------------------


def test_redis_unreachable_is_503_and_predict_keeps_working(own_service, cifar_jpeg):
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    svc = own_service(env={"REDIS_URL": dead})
    client = svc.client
    r = client.post("/explain", files=files(cifar_jpeg), data=SMALL)
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["code"] == "queue_unavailable"
    assert "cannot be reached" in error["message"] and "/predict is not affected" in error["message"]
    assert client.get(f"/explain/{uuid.uuid4()}").status_code == 503
    # Answered after one retry, not redis-py's ten: counted in the next test, not timed here.
    assert client.post("/predict", files=files(cifar_jpeg)).status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"  # the model serves: still ready
    assert ready.json()["redis"]["ok"] is False and ready.json()["redis"]["error"], ready.json()
    text = client.get("/metrics").text
    assert metric(text, "shapserve_explain_redis_up") == 0.0
    assert metric(text, "shapserve_explain_requests_total", outcome="redis_unavailable") == 1.0
    svc.stop()


def test_the_api_redis_client_tries_once_more_not_ten_times():
    """The API's Redis client (shapcore.jobs.queue.connect with a timeout) gives up after one
    retry, so /explain answers 503 at once while Redis is away, and still retries once (a
    Redis restart closes pooled connections). Counted as connections accepted by a real
    listener that closes each one at once (so every command fails with ConnectionError)."""
    import socket
    import threading

    import redis

    from shapcore.jobs.client import connect

    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    accepted = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    url = f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    try:
        with pytest.raises(redis.ConnectionError):
            connect(url, 2.0).ping()
    finally:
        listener.close()
    # one attempt and one retry, each of which may also open a connection for its health check
    assert 2 <= len(accepted) <= 4, len(accepted)


def test_failed_job_reports_its_reason(explain_service, api_worker, cifar_jpeg, explain_redis_url):
    """A job that raises (here: a version the registry does not have) fails with the reason;
    its heatmap answers 409 with that reason."""
    from shapcore.jobs.client import connect
    from shapcore.jobs.queue import JobRequest, submit
    from shapcore.jobs.settings import ExplainSettings

    settings = ExplainSettings(redis_url=explain_redis_url, explain_queue="explain-api", explain_retries=0)
    job, _ = submit(
        connect(explain_redis_url, 2.0),
        settings,
        JobRequest.of(
            job_image(cifar_jpeg), "20000101-000000-000000", segments=10, samples=30, background="mean", seed=0,
            target=None
        ),
    )
    client = explain_service.client
    doc = wait_finished(client, f"/explain/{job.id}")
    assert doc["status"] == "failed" and "unknown version" in doc["error"], doc
    r = client.get(f"/explain/{job.id}/heatmap.png")
    assert r.status_code == 409 and r.json()["error"]["code"] == "explanation_failed"
    assert "unknown version" in r.json()["error"]["message"]


def test_metrics_are_visible_to_prometheus(explain_service, finished):
    text = explain_service.client.get("/metrics").text
    assert metric(text, "shapserve_explain_redis_up") == 1.0
    assert metric(text, "shapserve_explain_workers") >= 1
    assert metric(text, "shapserve_explain_queue_depth") >= 0
    assert metric(text, "shapserve_explain_jobs_running") >= 0
    assert metric(text, "shapserve_explain_requests_total", outcome="accepted") >= 1
    # A job has finished, yet the API counts no job: that is each worker's own series alone.
    families = {f.name.removesuffix("_created") for f in text_string_to_metric_families(text)}
    explain_families = {name for name in families if name.startswith("shapserve_explain_")}
    assert explain_families == {
        "shapserve_explain_redis_up", "shapserve_explain_queue_depth", "shapserve_explain_jobs_running",
        "shapserve_explain_workers", "shapserve_explain_requests",
    }, explain_families  # fmt: skip
    assert not re.search(r"^shapserve_(?!explain_requests)\w*jobs?_(total|duration)", text, re.M), text
