"""Concurrent /predict requests over real HTTP, each with a different real CIFAR-10 image:
every answer is that image's own, however the batcher groups them."""

from __future__ import annotations

import pytest

from tests.support.concurrent_predict import assert_own_answers, batch_counts, distinct_images, predict_all

pytestmark = pytest.mark.timeout(600)

N = 24


def test_concurrent_requests_each_get_their_own_images_answer(service, small_archive):
    images, alone = distinct_images(service.client, small_archive, N)
    passes_before, images_before, _ = batch_counts(service.client)
    for _ in range(3):
        assert_own_answers(predict_all(service.url, images), alone)
    passes, batched, _ = batch_counts(service.client)
    assert batched - images_before == 3 * N
    # The point: several requests shared forward passes, so rows had to be handed back right.
    assert passes - passes_before < 3 * N, "every request ran alone: nothing here tested the batcher's rows"
