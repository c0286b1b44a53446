"""Overlap around the model: pictures of queued jobs decoded ahead (bounded, claiming nothing) and
outcomes saved by the finishing thread, with each job's result and failure its own."""

import numpy as np
import pytest

from attnseg.images import ImageMissingError, load_image
from attnseg.queue import SEGMENT_QUEUE, enqueue, get_queue
from tests.test_batch import pictures, stored_entry, submit
from workers.engine.dispatch import picture_side
from workers.engine.pictures import Prefetcher


def prefetcher(connection, depth=2, max_bytes=2**30) -> Prefetcher:
    """Not started: the test calls decode_front() where the thread would."""
    return Prefetcher(
        connection, [get_queue(connection, SEGMENT_QUEUE).key], picture_side, depth=depth, max_bytes=max_bytes
    )


def test_the_pictures_of_the_first_queued_jobs_are_decoded_ahead(worker_on):
    connection, settings, _ = worker_on
    jobs = [submit(connection, settings, image, resolution=64) for image in pictures(3)]
    ahead = prefetcher(connection, depth=2)
    ahead.decode_front()
    assert get_queue(connection, SEGMENT_QUEUE).count == 3  # nothing claimed

    for job in jobs:  # the first two from memory, the third fetched; the same pixels either way
        key = job.args[0]["image"]["key"]
        np.testing.assert_array_equal(
            ahead.load(connection, key, min_side=64), load_image(connection, key, min_side=64)
        )
    assert (ahead.hits, ahead.misses) == (2, 1)
    ahead.decode_front()  # the same jobs again: read once, decoded once
    assert ahead.hits + len(ahead._pictures) == 2


def test_each_picture_is_decoded_ahead_at_the_size_its_job_reads_it(worker_on):
    """selfcross at the SD resolution, the GEM methods at least at CLIP's input size."""
    from workers.methods.gem import GEM_IMAGE_SIZE

    connection, settings, _ = worker_on
    text = {"classes": ["cat"], "resolution": 256, "seed": 0}
    for method, image in zip(("selfcross", "gem"), pictures(2)):
        entry = stored_entry(connection, settings, image)
        enqueue(connection, settings, "text", {"params": {**text, "method": method}, "image": entry})
    ahead = prefetcher(connection)
    ahead.decode_front()
    assert sorted(side for _, side in ahead._pictures) == [256, GEM_IMAGE_SIZE]


def test_pictures_held_ahead_stay_under_the_byte_bound(worker_on):
    connection, settings, _ = worker_on
    jobs = [submit(connection, settings, image, resolution=64) for image in pictures(3)]
    one_picture = load_image(connection, jobs[0].args[0]["image"]["key"], min_side=64).nbytes
    ahead = prefetcher(connection, depth=3, max_bytes=one_picture)
    ahead.decode_front()
    held = [f.result().nbytes for f in ahead._pictures.values()]
    assert len(held) <= 1 and sum(held) <= one_picture


def test_a_picture_gone_before_its_job_runs_fails_that_job_as_today(worker_on):
    connection, settings, _ = worker_on
    job = submit(connection, settings, pictures(1)[0], resolution=64)
    key = job.args[0]["image"]["key"]
    connection.delete(key)
    ahead = prefetcher(connection)
    ahead.decode_front()
    with pytest.raises(ImageMissingError):
        ahead.load(connection, key, min_side=64)


def test_the_worker_reads_decoded_pictures_and_counts_its_busy_time(worker_on, monkeypatch):
    connection, settings, run = worker_on
    # The look-ahead done in place of waking the thread: the hit count no longer depends on how soon
    # the thread is scheduled on a loaded machine.
    monkeypatch.setattr(Prefetcher, "look_ahead", Prefetcher.decode_front)
    # Every other job has a vocabulary: it runs start to end in its job function, which reads the
    # look-ahead too.
    jobs = [
        submit(connection, settings, image, vocabulary=["sky", "grass"] if i % 2 else None)
        for i, image in enumerate(pictures(4))
    ]
    worker = run(max_batch=1)
    assert all(job.get_status(refresh=True) == "finished" for job in jobs)
    activity = worker.activity()
    # The first job's picture is fetched as it starts; each later one was decoded ahead.
    assert (activity["prefetch_hits"], activity["prefetch_misses"]) == (3, 1)
    assert activity["model_busy_s"] > 0
    assert worker.running() == []


def test_a_job_whose_masks_fail_to_encode_fails_alone(worker_on, monkeypatch):
    """Encoding runs on the finishing thread after the shared pass: its failure is that job's only."""
    from workers.engine import jobs as job_functions

    connection, settings, run = worker_on
    images = pictures(3)
    queued = [submit(connection, settings, image) for image in images]
    bad = queued[1].args[0]["image"]["key"]
    encode = job_functions.unsupervised_result

    def failing(ctx, payload, out):
        if payload["image"]["key"] == bad:
            raise RuntimeError("encoder broke")
        return encode(ctx, payload, out)

    monkeypatch.setattr(job_functions, "unsupervised_result", failing)
    run(max_batch=8)
    for job in queued:
        job.refresh()
    assert [job.get_status() for job in queued] == ["finished", "failed", "finished"]
    assert queued[1].meta["error"]["code"] == "internal_error" and "encoder broke" in queued[1].meta["error"]["message"]
    assert get_queue(connection, SEGMENT_QUEUE).started_job_registry.get_job_ids() == []
