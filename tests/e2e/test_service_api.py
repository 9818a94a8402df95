"""The prediction service over real HTTP: `python -m service` (uvicorn) in a subprocess,
a real smoke checkpoint, real images."""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.support.services import ROOT, class_probabilities, clone_version, metric, metric_or, swapped

pytestmark = pytest.mark.timeout(300)


def as_files(*items: tuple[str, bytes, str], field: str = "file") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, item) for item in items]


def check_predictions(body: dict, k: int, class_names: list[str]) -> None:
    preds = body["predictions"]
    assert len(preds) == k
    probs = [p["probability"] for p in preds]
    assert probs == sorted(probs, reverse=True)
    assert all(0.0 <= p <= 1.0 for p in probs) and sum(probs) <= 1.0 + 1e-5
    for p in preds:
        assert class_names[p["index"]] == p["label"]


@pytest.fixture(scope="module")
def class_names(service) -> list[str]:
    return service.client.get("/model").json()["class_names"]


@pytest.fixture(scope="module")
def jpeg_file(cifar_jpeg: bytes) -> tuple[str, bytes, str]:
    return ("cat.jpg", cifar_jpeg, "image/jpeg")


# -- operations -----------------------------------------------------------------------------


def test_health_readiness_and_docs(service, smoke_model):
    assert service.client.get("/healthz").json() == {"status": "ok"}
    ready = service.client.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready"
    assert body["model"]["version"] == smoke_model[1]
    assert body["redis"]["ok"] is True
    docs = service.client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = service.client.get("/openapi.json").json()
    assert "multipart/form-data" in spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    routes = {"/predict", "/model", "/model/reload", "/model/confusion-matrix.png", "/metrics", "/healthz", "/readyz"}
    assert routes <= set(spec["paths"])


def test_unknown_route_and_method_use_the_error_format(service):
    r = service.client.get("/nope/123")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = service.client.get("/predict")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


# -- /predict ---------------------------------------------------------------------------------


def test_predict_one_jpeg(service, jpeg_file, class_names, smoke_model):
    r = service.client.post("/predict", files=as_files(jpeg_file))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {"name": "resnet50-cifar10", "version": smoke_model[1]}
    check_predictions(body, 3, class_names)
    assert body["latency_ms"] > 0


@pytest.mark.parametrize("k", [1, 10])
def test_predict_top_k(service, jpeg_file, class_names, k):
    r = service.client.post("/predict", params={"top_k": k}, files=as_files(jpeg_file))
    assert r.status_code == 200, r.text
    check_predictions(r.json(), k, class_names)


def test_several_files_give_one_result_each_in_order(service, jpeg_file, odd_images, class_names):
    items = [jpeg_file, odd_images["greyscale_png"], odd_images["bmp"], odd_images["exif_rotated_jpeg"]]
    r = service.client.post("/predict", params={"top_k": 2}, files=as_files(*items))
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [res["filename"] for res in results] == [item[0] for item in items]
    for item, res in zip(items, results, strict=True):
        single = service.client.post("/predict", params={"top_k": 2}, files=as_files(item)).json()["predictions"]
        assert [p["index"] for p in res["predictions"]] == [p["index"] for p in single]
        for a, b in zip(res["predictions"], single, strict=True):
            assert a["probability"] == pytest.approx(b["probability"], abs=1e-4)


@pytest.mark.parametrize(
    "name",
    [
        "greyscale_png",
        "palette_png",
        "rgba_png",
        "16bit_png",
        "cmyk_jpeg",
        "animated_gif",
        "exif_rotated_jpeg",
        "webp",
        "bmp",
        "tiff",
    ],
)
def test_odd_formats_are_answered(service, odd_images, class_names, name):
    r = service.client.post("/predict", files=as_files(odd_images[name]))
    assert r.status_code == 200, r.text
    check_predictions(r.json(), 3, class_names)


def test_lossless_conversions_predict_like_the_original(service, cifar_jpeg, odd_images):
    """The BMP/TIFF/lossless WebP copies hold the very pixels of the JPEG: same answer."""
    ref = service.client.post("/predict", files=as_files(("a.jpg", cifar_jpeg, "image/jpeg"))).json()
    for name in ("bmp", "tiff", "webp"):
        got = service.client.post("/predict", files=as_files(odd_images[name])).json()
        assert got["predictions"] == ref["predictions"], name
    grey = service.client.post("/predict", files=as_files(odd_images["greyscale_png"])).json()
    grey16 = service.client.post("/predict", files=as_files(odd_images["16bit_png"])).json()
    assert grey["predictions"] == grey16["predictions"]


# -- bad inputs -----------------------------------------------------------------------------


def big_png_bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (12000, 12000)).save(buf, "PNG")
    data = buf.getvalue()
    assert len(data) < 1_000_000
    return data


def truncated_jpeg() -> bytes:
    import numpy as np

    noise = Image.fromarray(np.random.default_rng(1).integers(0, 255, (96, 96, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, "JPEG")
    return buf.getvalue()[:-700]


MULTIPART_X = {"content-type": "multipart/form-data; boundary=x"}
CUT_MULTIPART = b'--x\r\nContent-Disposition: form-data; name="file"\r\n\r\nabc'
BAD_REQUESTS = {
    # name: (request kwargs, expected status, expected code)
    "not_an_image": (lambda: {"files": as_files(("a.jpg", b"no, just text " * 20, "image/jpeg"))}, 415, "not_an_image"),
    "truncated_image": (lambda: {"files": as_files(("t.jpg", truncated_jpeg(), "image/jpeg"))}, 422, "corrupt_image"),
    "empty_body": (lambda: {"content": b"", "headers": MULTIPART_X}, 400, "empty_body"),
    "no_body_at_all": (lambda: {}, 400, "empty_body"),
    "empty_file": (lambda: {"files": as_files(("e.png", b"", "image/png"))}, 422, "empty_file"),
    "wrong_field_name": (lambda: {"files": as_files(("a.png", b"x", "image/png"), field="image")}, 422, "missing_file"),
    "no_file_field": (lambda: {"data": {"comment": "hello"}}, 415, "unsupported_media_type"),
    "other_fields_only": (
        lambda: {"data": {"comment": "hi"}, "files": as_files(("n", b"1", "text/plain"), field="other")},
        422,
        "missing_file",
    ),
    "not_multipart": (lambda: {"content": b"\xff\xd8\xff" * 9, "headers": {"content-type": "image/jpeg"}}, 415,
                      "unsupported_media_type"),
    "cut_multipart": (lambda: {"content": CUT_MULTIPART, "headers": MULTIPART_X}, 400, "malformed_multipart"),
    "decompression_bomb": (lambda: {"files": as_files(("bomb.png", big_png_bomb(), "image/png"))}, 413,
                           "image_too_large"),
    "upload_too_large": (lambda: {"files": as_files(("big.jpg", b"\xff" * (10 * 1024 * 1024 + 1), "image/jpeg"))},
                         413, "upload_too_large"),
    "too_many_files": (lambda: {"files": as_files(*[("a.png", b"x", "image/png")] * 17)}, 422, "too_many_files"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_inputs_are_refused_logged_and_counted(service, jpeg_file, case):
    make, status, code = BAD_REQUESTS[case]
    before = metric(service.client.get("/metrics").text, "shapserve_rejected_inputs_total", reason=code)
    r = service.client.post("/predict", **make())
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["code"] == code and len(error["message"]) > 10
    after = metric(service.client.get("/metrics").text, "shapserve_rejected_inputs_total", reason=code)
    assert after == before + 1
    assert f": {code} (" in service.log_tail(200_000)
    ok = service.client.post("/predict", files=as_files(jpeg_file))  # and it goes on serving
    assert ok.status_code == 200


def test_one_bad_file_among_several_names_it(service, jpeg_file):
    r = service.client.post("/predict", files=as_files(jpeg_file, ("second.png", b"nope" * 10, "image/png")))
    assert r.status_code == 415
    assert "file #2 ('second.png')" in r.json()["error"]["message"]


def test_chunked_upload_over_the_limit_is_refused_while_streaming(service):
    """No Content-Length: the service counts bytes as they arrive and stops at the limit."""

    def body():
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
        for _ in range(64):  # up to 64 MiB offered
            yield b"\xff" * (1024 * 1024)
        yield b"\r\n--x--\r\n"

    try:
        r = service.client.post("/predict", content=body(), headers={"content-type": "multipart/form-data; boundary=x"})
    except httpx.HTTPError:
        pytest.fail("the service should answer 413, not drop the connection")
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "upload_too_large"


@pytest.mark.parametrize("value", ["0", "11", "-1", "abc", "3.5", ""])
def test_top_k_out_of_range_or_not_a_number(service, jpeg_file, value):
    r = service.client.post(f"/predict?top_k={value}", files=as_files(jpeg_file))
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_parameter" and "top_k" in error["message"]


#: Growth of the service's peak RSS (VmHWM) over the big bad inputs, measured on a fresh
#: process after warm-up: decoding the 12000x12000 bomb takes 144 MB (432 MB as RGB), holding
#: a 50 MB body 50 MB+, the 64 MiB chunked one 64 MB; refused as they must be, they hold at
#: most the 10 MB the limit lets through.
BIG_INPUT_PEAK_BOUND_KIB = 32 * 1024


def chunked_64mib() -> dict:
    """A multipart body of 64 MiB sent without Content-Length (counted while it streams)."""

    def body() -> Iterator[bytes]:
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
        for _ in range(64):
            yield b"\xff" * (1024 * 1024)
        yield b"\r\n--x--\r\n"

    return {"content": body(), "headers": MULTIPART_X}


def test_memory_stays_bounded_after_bad_inputs(own_service, jpeg_file):
    """A fresh process (VmHWM never falls: a shared one has already seen big inputs): its peak
    after warm-up, then after the bomb and the oversized bodies, must not grow by what
    decoding or buffering any of them would take."""
    svc = own_service()
    for _ in range(3):  # warm-up: the model's first passes, the decoder, the multipart parser, the error path
        assert svc.client.post("/predict", files=as_files(jpeg_file)).status_code == 200
        assert svc.client.post("/predict", **BAD_REQUESTS["not_an_image"][0]()).status_code == 415
    before = svc.memory_kib()
    fifty_mb = as_files(("big.jpg", b"\xff\xd8\xff\xe0" + bytes(50 * 1024 * 1024), "image/jpeg"))
    for _ in range(3):
        assert svc.client.post("/predict", **BAD_REQUESTS["decompression_bomb"][0]()).status_code == 413
        assert svc.client.post("/predict", files=fifty_mb).status_code == 413
        assert svc.client.post("/predict", **chunked_64mib()).status_code == 413
    after = svc.memory_kib()
    assert after["VmHWM"] - before["VmHWM"] < BIG_INPUT_PEAK_BOUND_KIB, (before, after)
    assert svc.client.post("/predict", files=as_files(jpeg_file)).status_code == 200


def test_declared_oversized_upload_is_answered_without_reading_the_rest(service):
    """A raw client declares a body over MAX_UPLOAD_BYTES and sends only its first part: the
    service answers 413 and closes the connection without waiting for (or reading) the rest."""
    head = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
    declared = 50 * 1024 * 1024
    host, port = service.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            + f"Content-Length: {declared}\r\n\r\n".encode()
            + head
            + b"\xff" * (64 * 1024)
        )
        received = b""
        while chunk := sock.recv(65536):  # the service closes: recv returns b"" (a timeout fails the test)
            received += chunk
    status_line, _, rest = received.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413"), received[:500]
    head_block, _, body = rest.partition(b"\r\n\r\n")
    assert json.loads(body)["error"]["code"] == "upload_too_large", (head_block, body[:500])


# -- /model and /metrics ----------------------------------------------------------------------


def test_model_metadata_and_evaluation(service, service_registry, smoke_model):
    body = service.client.get("/model").json()
    assert body["version"] == smoke_model[1] and body["promoted"] is True
    assert body["input_size"] == 32 and len(body["class_names"]) == 10
    evaluation = body["evaluation"]
    on_disk = json.loads((service_registry / smoke_model[1] / "metrics.json").read_text())
    assert evaluation["accuracy"] == on_disk["accuracy"]
    assert set(evaluation["macro"]) == {"precision", "recall", "f1"}
    assert set(evaluation["per_class"]) == set(body["class_names"])
    assert len(evaluation["confusion_matrix"]) == 10
    png = service.client.get("/model/confusion-matrix.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG")


def test_metrics_exposition(service, jpeg_file, smoke_model, service_registry):
    service.client.post("/predict", files=as_files(jpeg_file))
    service.client.get("/nope/raw/path/42")
    text = service.client.get("/metrics").text
    for name in (
        "shapserve_http_requests_total",
        "shapserve_http_request_duration_seconds_bucket",
        "shapserve_inference_duration_seconds_bucket",
        "shapserve_batch_size_bucket",
        "shapserve_batcher_queue_depth",
        "shapserve_rejected_inputs_total",
        "shapserve_model_info",
        "shapserve_model_accuracy",
        "shapserve_model_macro_f1",
        "shapserve_model_class_f1",
    ):
        assert name in text, name
    assert metric(text, "shapserve_http_requests_total", route="/predict", method="POST", status="200") >= 1
    assert metric(text, "shapserve_http_requests_total", route="<unmatched>", method="GET", status="404") >= 1
    assert "/nope/raw/path/42" not in text  # raw paths never become labels
    assert 'le="0.001"' in text and 'le="10.0"' in text
    assert metric(text, "shapserve_model_info", version=smoke_model[1], name="resnet50-cifar10") == 1
    on_disk = json.loads((service_registry / smoke_model[1] / "metrics.json").read_text())
    assert metric(text, "shapserve_model_accuracy") == pytest.approx(on_disk["accuracy"])
    assert metric(text, "shapserve_model_macro_f1") == pytest.approx(on_disk["macro"]["f1"])
    cat_f1 = on_disk["per_class"]["cat"]["f1"]
    assert metric(text, "shapserve_model_class_f1", class_name="cat") == pytest.approx(cat_f1)


def test_concurrent_requests_share_forward_passes(service, jpeg_file):
    import asyncio

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=service.url, timeout=60) as client:
            rs = await asyncio.gather(*(client.post("/predict", files=as_files(jpeg_file)) for _ in range(24)))
        return [r.status_code for r in rs]

    text = service.client.get("/metrics").text
    count0, sum0 = metric(text, "shapserve_batch_size_count"), metric(text, "shapserve_batch_size_sum")
    assert asyncio.run(burst()) == [200] * 24
    text = service.client.get("/metrics").text
    count1, sum1 = metric(text, "shapserve_batch_size_count"), metric(text, "shapserve_batch_size_sum")
    assert sum1 - sum0 == 24
    assert count1 - count0 < 24  # some forward passes served several requests


# -- model switching --------------------------------------------------------------------------


@pytest.fixture
def own_registry(service_registry: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "registry"
    shutil.copytree(service_registry, dest)
    return dest


def probabilities_of(client: httpx.Client, image: tuple[str, bytes, str]) -> list[float]:
    r = client.post("/predict", params={"top_k": 10}, files=as_files(image))
    assert r.status_code == 200, r.text
    return class_probabilities(r.json())


def swap_for(reference: list[float]) -> tuple[int, int]:
    """The classes to exchange in the new version: the top class of ``reference`` and its least
    likely one, so the top class changes and every answer tells which weights computed it."""
    top = max(range(len(reference)), key=reference.__getitem__)
    bottom = min(range(len(reference)), key=reference.__getitem__)
    assert reference[top] - reference[bottom] > 1e-3, reference  # the two versions are told apart
    return top, bottom


def check_version_probabilities(
    answers: list[tuple[int, str | None, list[float] | None]], expected: dict[str, list[float]]
) -> None:
    """Every 200 tagged with a version carries that version's probabilities (batched passes
    differ from single ones by float rounding only)."""
    for status, version, probs in answers:
        assert status == 200 and version in expected, (status, version)
        assert probs == pytest.approx(expected[version], abs=1e-4), (version, probs, expected)


def test_model_switch_under_concurrent_load(own_service, own_registry, smoke_model, jpeg_file):
    import asyncio

    from service.auth import mint

    old = smoke_model[1]
    user, user_entry = mint("load")
    admin, admin_entry = mint("ops", admin=True)
    keys = f"{user_entry.entry()},{admin_entry.entry()}"
    svc = own_service(registry=own_registry, env={"API_KEYS": keys, "BATCH_MAX_SIZE": "8"})
    svc.client.headers["X-API-Key"] = user
    ref_old = probabilities_of(svc.client, jpeg_file)
    swap = swap_for(ref_old)
    # Different weights: the new version's top class for the picture is the old one's least likely.
    new = clone_version(own_registry, old, "20991231-000000-abcdef", swap_classes=swap)
    expected = {old: ref_old, new: swapped(ref_old, swap)}
    assert svc.client.get("/model").json()["version"] == old  # promoted, though not the newest
    assert svc.client.post("/model/reload", json={"version": new}).status_code == 403  # not an admin key
    assert svc.client.get("/model").json()["version"] == old

    async def run() -> tuple[list[tuple[int, str | None, list[float] | None]], httpx.Response]:
        results: list[tuple[int, str | None, list[float] | None]] = []
        stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=svc.url, timeout=60, headers={"X-API-Key": user}) as client:

            async def load() -> None:
                while not stop.is_set():
                    try:
                        r = await client.post("/predict", params={"top_k": 10}, files=as_files(jpeg_file))
                        ok = r.status_code == 200
                        results.append((r.status_code, r.json().get("model", {}).get("version"),
                                        class_probabilities(r.json()) if ok else None))  # fmt: skip
                    except httpx.HTTPError as exc:
                        results.append((0, repr(exc), None))

            workers = [asyncio.create_task(load()) for _ in range(8)]
            while len(results) < 20:
                await asyncio.sleep(0.05)
            reload = await client.post(
                "/model/reload", json={"version": new}, headers={"X-API-Key": admin}
            )
            n = len(results)
            while len(results) < n + 20:
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*workers)
        return results, reload

    results, reload = asyncio.run(run())
    assert reload.status_code == 200, reload.text
    assert reload.json()["previous"] == old and reload.json()["current"] == new and reload.json()["changed"]
    failures = [r for r in results if r[0] != 200]
    assert failures == []
    versions = [v for _, v, _ in results]
    assert versions[0] == old and versions[-1] == new and set(versions) == {old, new}
    check_version_probabilities(results, expected)  # no answer of the old weights tagged new, nor the reverse
    assert svc.client.get("/model").json()["version"] == new
    after = probabilities_of(svc.client, jpeg_file)
    assert after == pytest.approx(expected[new], abs=1e-4)
    assert after != pytest.approx(ref_old, abs=1e-4)  # the new weights serve, not the old ones relabelled
    text = svc.client.get("/metrics").text
    assert metric(text, "shapserve_model_info", version=new) == 1
    assert metric_or(text, "shapserve_model_info", 0.0, version=old) == 0  # gone or zeroed: both say "not served"
    assert metric(text, "shapserve_model_reloads_total", result="success") == 1

    # An admin key is required (none: 401, a user key: 403); unknown versions are refused and the
    # served one stays.
    assert httpx.post(f"{svc.url}/model/reload", json={"version": old}).status_code == 401
    assert svc.client.post("/model/reload", json={"version": old}).status_code == 403
    admin_key = {"X-API-Key": admin}
    r = svc.client.post("/model/reload", json={"version": "20000101-000000-000000"}, headers=admin_key)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_version"
    r = svc.client.post("/model/reload", json={"version": new}, headers=admin_key)
    assert r.status_code == 200 and r.json()["changed"] is False
    assert svc.client.get("/model").json()["version"] == new
    assert probabilities_of(svc.client, jpeg_file) == pytest.approx(expected[new], abs=1e-4)


def test_promoted_pointer_is_watched(own_service, own_registry, smoke_model, jpeg_file):
    import time

    from shapcore.registry import Registry

    old = smoke_model[1]
    svc = own_service(registry=own_registry, env={"MODEL_WATCH_INTERVAL_S": "0.3"})
    assert svc.client.get("/model").json()["version"] == old
    ref_old = probabilities_of(svc.client, jpeg_file)
    swap = swap_for(ref_old)
    new = clone_version(own_registry, old, "20991231-000001-fedcba", swap_classes=swap)
    Registry(own_registry).promote(new)
    deadline = time.monotonic() + 120
    while svc.client.get("/model").json()["version"] != new:
        assert time.monotonic() < deadline, svc.log_tail()
        time.sleep(0.2)
    r = svc.client.post("/predict", params={"top_k": 10}, files=as_files(jpeg_file))
    assert r.json()["model"]["version"] == new
    assert class_probabilities(r.json()) == pytest.approx(swapped(ref_old, swap), abs=1e-4)


def test_unloadable_model_is_alive_but_not_ready(own_service, own_registry, smoke_model):
    version = smoke_model[1]
    (own_registry / version / "model.safetensors").write_bytes(b"corrupt")
    svc = own_service(registry=own_registry, wait="alive")
    import time

    deadline = time.monotonic() + 120
    while (r := svc.client.get("/readyz")).json()["status"] == "loading":
        assert time.monotonic() < deadline, svc.log_tail()
        time.sleep(0.2)
    assert r.status_code == 503 and r.json()["status"] == "failed"
    assert "model.safetensors" in r.json()["error"]
    assert svc.client.get("/healthz").status_code == 200
    assert svc.client.post("/predict", files=as_files(("a.png", b"x", "image/png"))).json()["error"]["code"] == (
        "model_not_ready"
    )


def test_empty_registry_fails_fast_with_one_line(tmp_path):
    env = {"MODEL_REGISTRY": str(tmp_path / "nothing"), "PORT": "0", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: registry") and proc.stderr.count("\n") == 1


def test_port_in_use_is_reported(own_service):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        svc = own_service(env={"PORT": str(port)}, wait=None)
        assert svc.proc.wait(timeout=120) != 0
        assert "address already in use" in svc.log_tail().lower()
