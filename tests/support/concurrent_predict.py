"""Helpers for the tests that send many /predict requests at once (no tests here).

``distinct_images``  real CIFAR-10 JPEGs from the small archive whose answers differ enough
                     that a mixed-up answer would be seen.
``predict_all``      one request per image, all at once (httpx.AsyncClient), answers in order.
``probabilities``    an answer as a vector of the ten class probabilities.
``sample``           one sample's value in a Prometheus exposition.
"""

from __future__ import annotations

import asyncio
import tarfile
from pathlib import Path

import httpx
import numpy as np

from tests.support.services import metric

#: An answer matches an image's single-request answer to this (batched and single forward
#: passes differ by float rounding only).
SAME_ANSWER_ATOL = 1e-4
#: The answers of two images chosen by distinct_images differ by at least this much.
DISTINCT_BY = 1e-2


def archive_images(archive: Path, n: int) -> list[bytes]:
    """The first ``n`` images of the archive, round-robin over its classes."""
    by_class: dict[str, list[bytes]] = {}
    with tarfile.open(archive, "r|*") as tar:
        for member in tar:
            if member.isfile():
                by_class.setdefault(Path(member.name).parts[1], []).append(tar.extractfile(member).read())
    rounds = zip(*by_class.values(), strict=False)
    return [image for batch in rounds for image in batch][:n]


def probabilities(answer: dict) -> np.ndarray:
    """The 10 class probabilities of a single-image answer (asked with top_k=10), by class index."""
    out = np.full(10, np.nan)
    for p in answer["predictions"]:
        out[p["index"]] = p["probability"]
    assert not np.isnan(out).any(), answer
    return out


def predict_one(client: httpx.Client, image: bytes) -> np.ndarray:
    r = client.post("/predict", params={"top_k": 10}, files={"file": ("img.jpg", image, "image/jpeg")})
    assert r.status_code == 200, r.text
    return probabilities(r.json())


def distinct_images(client: httpx.Client, archive: Path, n: int) -> tuple[list[bytes], np.ndarray]:
    """``n`` real images, each answered (one request at a time) unlike every other by at least
    DISTINCT_BY in some class probability, and those single-request answers (n, 10)."""
    chosen: list[bytes] = []
    answers: list[np.ndarray] = []
    for image in archive_images(archive, 6 * n):
        p = predict_one(client, image)
        if all(np.abs(p - q).max() >= DISTINCT_BY for q in answers):
            chosen.append(image)
            answers.append(p)
            if len(chosen) == n:
                return chosen, np.stack(answers)
    raise AssertionError(f"only {len(chosen)} of {n} images with distinct answers in {archive}")


def predict_all(url: str, images: list[bytes]) -> list[np.ndarray]:
    """Every image in its own /predict request, all in flight at once; answers in image order."""

    async def main() -> list[np.ndarray]:
        limits = httpx.Limits(max_connections=len(images))
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

            async def one(i: int, image: bytes) -> np.ndarray:
                r = await client.post(
                    "/predict", params={"top_k": 10}, files={"file": (f"img{i}.jpg", image, "image/jpeg")}
                )
                assert r.status_code == 200, r.text
                return probabilities(r.json())

            return await asyncio.gather(*(one(i, image) for i, image in enumerate(images)))

    return asyncio.run(main())


def assert_own_answers(got: list[np.ndarray], expected: np.ndarray) -> None:
    """Each answer is its own image's, and closer to it than to any other image's."""
    for i, p in enumerate(got):
        distances = np.abs(expected - p).max(axis=1)
        assert distances[i] <= SAME_ANSWER_ATOL, (
            f"answer {i} is not its image's: off by {distances[i]:.3g}; closest is image {int(np.argmin(distances))}"
        )


def batch_counts(client: httpx.Client) -> tuple[float, float, float]:
    """(forward passes, images in them, passes of exactly one image) so far."""
    text = client.get("/metrics").text
    return (
        metric(text, "shapserve_batch_size_count"),
        metric(text, "shapserve_batch_size_sum"),
        metric(text, "shapserve_batch_size_bucket", le="1.0"),
    )
