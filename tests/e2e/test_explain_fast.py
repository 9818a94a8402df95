"""``method=fast`` over real HTTP: ``python -m service`` on the real Redis, a real smoke checkpoint,
an explainer fitted by the real ``python -m training fit-explainer`` on real CIFAR-10 JPEGs.

409 without an explainer, then (after the fit, picked up by the running service) 200 answered in
the request with a kernel result's shape and the explainer's quality figures (its fit scored it
against KernelSHAP), its heatmap and faithfulness curves at URLs; an explainer copied from another
version refused with its reason, and the same explainer refused below the floor
``EXPLAIN_FAST_MIN_RHO`` with its figure. The smoke explainer is weak (a 30-second fit of a smoke
model): the main service here serves any scored explainer (``EXPLAIN_FAST_MIN_RHO=-1``).
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shapcore.fastshap import EXPLAINER_FILE
from shapcore.players import GRID_CELLS
from tests.support.services import clone_version
from tests.support.services import image_file as files

pytestmark = pytest.mark.timeout(600)
M = GRID_CELLS * GRID_CELLS


@pytest.fixture(scope="module")
def fast_registry(service_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("fast") / "registry"
    shutil.copytree(service_registry, dest)
    return dest


@pytest.fixture(scope="module")
def fast_service(start_service, explain_redis_url, fast_registry):
    svc = start_service(registry=fast_registry, env={"REDIS_URL": explain_redis_url, "EXPLAIN_FAST_MIN_RHO": "-1"})
    yield svc
    svc.stop()


def _version(registry: Path) -> str:
    return (registry / "PROMOTED").read_text().strip()


@pytest.fixture(scope="module")
def fitted(fast_service, fast_registry: Path, small_archive: Path) -> Path:
    """Before the fit: no explainer (409; /model says none). Then fit one, while the service runs."""
    client = fast_service.client
    r = client.post("/explain", files=files(_jpeg(small_archive)), data={"method": "fast"})
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "no_explainer"
    assert "python -m training fit-explainer" in r.json()["error"]["message"]
    assert client.get("/model").json()["explainer"] is None

    from training.cli import main

    code = main(["--quiet", "--registry", str(fast_registry), "fit-explainer", "--data", str(small_archive),
                 "--time-budget", "0.5", "--width", "8", "--quality-images", "2", "--quality-samples", "128"])
    assert code == 0
    path = fast_registry / _version(fast_registry) / EXPLAINER_FILE
    assert path.is_file()
    return path


_JPEG: dict[str, bytes] = {}


def _jpeg(archive: Path) -> bytes:
    """One real CIFAR-10 JPEG from the archive (a dog)."""
    if "dog" not in _JPEG:
        import tarfile

        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                if member.isfile() and "/dog/" in member.name:
                    _JPEG["dog"] = tar.extractfile(member).read()
                    break
    return _JPEG["dog"]


def test_fast_answers_in_the_request_with_a_kernel_results_shape(fast_service, fitted, cifar_jpeg, smoke_model):
    client = fast_service.client
    info = client.get("/model").json()["explainer"]
    assert info["available"] is True and info["players"] == M and info["forward_ms"] > 0
    assert info["served"] is True and info["quality"]["images"] == 2 and info["quality"]["reference"]["samples"] == 128

    r = client.post("/explain", files=files(cifar_jpeg), data={"method": "fast"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "finished" and body["stored"] is True
    result = body["result"]
    assert result["method"] == "fast" and result["segments"]["count"] == M and len(result["shap_values"]) == M
    # efficient by construction: base + Σφ = f(x) for every class
    for c in result["classes"]:
        assert abs(c["base_value"] + sum(c["shap_values"]) - c["probability"]) < 1e-4
    assert np.std(result["shap_values"]) > 0  # not the even split
    # quality travels with the answer: the figures its fit measured against KernelSHAP
    carried = result["explainer"]["quality"]
    assert carried == {k: v for k, v in info["quality"].items() if k in carried} and len(carried) >= 9
    for key in ("median_rho", "median_relative_l2", "deletion_auc", "insertion_auc"):
        assert isinstance(carried[key], float) and isinstance(carried["kernel"][key], float)

    # the same shape as a queued method's result: every key a KernelSHAP result has
    kernel = _kernel_result(smoke_model, cifar_jpeg)
    assert set(kernel) - {"faithfulness", "faithfulness_evaluations", "evaluations_per_second"} <= set(result)
    assert set(kernel["classes"][0]) <= set(result["classes"][0])

    status = client.get(body["status_url"])
    assert status.status_code == 200 and status.json()["status"] == "finished"
    assert status.json()["result"]["shap_values"] == result["shap_values"]
    png = client.get(body["heatmap_url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size[0] >= 256
    assert body["faithfulness_url"] is None and result.get("faithfulness") is None


def test_fast_with_faithfulness_curves_and_a_chosen_target(fast_service, fitted, cifar_jpeg):
    client = fast_service.client
    r = client.post("/explain", files=files(cifar_jpeg), data={"method": "fast", "faithfulness": "true",
                                                               "target": "dog"})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    result = body["result"]
    assert result["target"]["label"] == "dog"
    faith = result["faithfulness"]
    assert 0.0 <= faith["deletion_auc"] <= 1.0 and 0.0 <= faith["insertion_auc"] <= 1.0
    assert faith["steps"] == 32 and result["faithfulness_evaluations"] > 50
    png = client.get(body["faithfulness_url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    for flag in ("maybe", "1", "yes"):  # exactly true or false, as the schema's enum says
        bad = client.post("/explain", files=files(cifar_jpeg), data={"method": "fast", "faithfulness": flag})
        assert bad.status_code == 422 and "faithfulness must be true or false" in bad.text


def test_an_explainer_of_another_version_is_refused_with_its_reason(own_service, explain_redis_url, fast_registry,
                                                                   fitted, cifar_jpeg):  # fmt: skip
    version = _version(fast_registry)
    other = clone_version(fast_registry, version, "20990101-000000-aaaaaa")
    shutil.copy(fitted, fast_registry / other / EXPLAINER_FILE)
    svc = own_service(registry=fast_registry, env={"REDIS_URL": explain_redis_url, "MODEL_VERSION": other})
    info = svc.client.get("/model").json()["explainer"]
    assert info["available"] is False and f"fitted for model version '{version}'" in info["error"]
    r = svc.client.post("/explain", files=files(cifar_jpeg), data={"method": "fast"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "explainer_unusable"
    assert "fit-explainer --version 20990101-000000-aaaaaa" in r.json()["error"]["message"]
    assert svc.client.get("/predict").status_code == 405  # the service itself is fine
    ok = svc.client.post("/predict", files=files(cifar_jpeg))
    assert ok.status_code == 200


def test_below_the_floor_the_explainer_is_refused_with_its_figure(own_service, explain_redis_url, fast_registry,
                                                                  fitted, cifar_jpeg):  # fmt: skip
    from shapcore.fastshap import read_meta

    rho = read_meta(fitted)["quality"]["median_rho"]
    floor = min(1.0, round(rho + 0.01, 2))
    assert floor > rho
    svc = own_service(registry=fast_registry, env={"REDIS_URL": explain_redis_url, "EXPLAIN_FAST_MIN_RHO": str(floor)})
    r = svc.client.post("/explain", files=files(cifar_jpeg), data={"method": "fast"})
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "explainer_below_floor" and f"median Spearman rho {rho:.3f}" in error["message"]
    assert f"EXPLAIN_FAST_MIN_RHO={floor:g}" in error["message"] and "fit-explainer --version" in error["message"]
    assert error["details"][0]["value"] == rho and error["details"][0]["floor"] == floor
    info = svc.client.get("/model").json()["explainer"]
    assert info["served"] is False and info["quality"]["median_rho"] == rho


def _kernel_result(smoke_model: tuple[Path, str], jpeg: bytes) -> dict:
    """A KernelSHAP result of the smoke model, computed in process by the worker's own code."""
    import torch

    from shapcore.background import make_background
    from shapcore.explain.background import parse_background
    from shapcore.explain.request import ExplainRequest
    from shapcore.model import to_source_size
    from shapcore.registry import Registry
    from worker.explain import ModelRuntime, explain_image

    loaded = Registry(smoke_model[0]).load(smoke_model[1])
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    model_input = to_source_size(image)
    bg = make_background(parse_background("mean", 100), loaded.background(), model_input)
    params = ExplainRequest(segments=8, samples=40, background="mean", seed=0)
    with torch.inference_mode():
        result, _, _ = explain_image(ModelRuntime(loaded.model, loaded.class_names, bg), params, image, model_input)
    return result


def test_a_fast_answer_is_kept_only_for_its_short_ttl(fast_service, fitted, cifar_jpeg, explain_redis_url):
    """Every fast request stores its answer for its URLs: for EXPLAIN_FAST_RESULT_TTL_S (10 min), not
    the day a queued job's result is kept, so a /predict-rate stream of them cannot fill Redis."""
    import redis

    from shapcore.jobs.keys import artifact_key, inline_key

    r = fast_service.client.post("/explain", files=files(cifar_jpeg), data={"method": "fast"})
    assert r.status_code == 200, r.text
    conn = redis.Redis.from_url(explain_redis_url)
    job_id = r.json()["job_id"]
    for key in (inline_key(job_id), artifact_key(job_id)):
        assert 500 < conn.ttl(key) <= 600
