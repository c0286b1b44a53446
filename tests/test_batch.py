"""Cross-request batching: one shared pass gives each job exactly the masks it gets alone, jobs are
claimed once, and one bad job never fails its neighbours."""

import io

import numpy as np
from PIL import Image

from attnseg import rle
from attnseg.images import store_bytes
from attnseg.queue import SEGMENT_QUEUE, enqueue, get_queue
from workers.methods.unsupervised import attention_pass, segment_row, segment_unsupervised

PARAMS = {
    "kl_threshold": 1.0,
    "grid": 4,
    "iterations": 2,
    "timestep": 300,
    "resolution": 64,
    "refine": False,
    "vocabulary": None,
    "seed": 1,
}


def pictures(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    sizes = [(40, 52), (64, 64), (33, 90), (70, 45), (20, 30)]
    return [rng.integers(0, 256, size=(*sizes[i % 5], 3), dtype=np.uint8) for i in range(count)]


def test_shared_pass_gives_each_image_its_own_masks(tiny_sd):
    images = pictures(3)
    options = [dict(kl_threshold=0.6, grid=4), dict(kl_threshold=1.5, grid=8, refine=True), dict(iterations=1, grid=4)]
    shared = attention_pass(tiny_sd, images, timestep=300, resolution=64)
    for row, (image, own) in enumerate(zip(images, options)):
        batched = segment_row(shared, row, image.shape[:2], **own)
        alone = segment_unsupervised(tiny_sd, image, timestep=300, resolution=64, **own)
        np.testing.assert_array_equal(batched.labels, alone.labels)
        assert batched.labels.shape == image.shape[:2]


def stored_entry(connection, settings, image: np.ndarray) -> dict:
    """A payload's picture entry, as the API stores an upload (PNG bytes as received)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return {
        "key": store_bytes(connection, "default", buffer.getvalue(), settings.image_ttl_s),
        "width": image.shape[1],
        "height": image.shape[0],
    }


def submit(connection, settings, image: np.ndarray, **params):
    entry = stored_entry(connection, settings, image)
    return enqueue(connection, settings, "unsupervised", {"params": {**PARAMS, **params}, "image": entry})


def test_worker_batches_compatible_jobs_and_each_keeps_its_outcome(worker_on):
    connection, settings, run = worker_on
    images = pictures(5)
    batched = [
        submit(connection, settings, images[0]),
        submit(connection, settings, images[1], kl_threshold=2.0),
        submit(connection, settings, images[2], grid=8),
    ]
    expired = submit(connection, settings, images[4])
    connection.delete(expired.args[0]["image"]["key"])  # its image is gone: this job alone fails
    other_timestep = submit(connection, settings, images[3], timestep=100)  # cannot share: runs alone
    run(max_batch=8)

    for job in (*batched, expired, other_timestep):
        job.refresh()
    assert [job.get_status() for job in batched] == ["finished"] * 3
    assert expired.get_status() == "failed" and expired.meta["error"]["code"] == "image_expired"
    assert other_timestep.get_status() == "finished"
    results = [job.return_value() for job in batched]
    # One pass for the three: the shared stages' times are the batch's.
    assert len({result["timings_ms"]["unet"] for result in results}) == 1
    assert other_timestep.return_value()["timings_ms"]["unet"] != results[0]["timings_ms"]["unet"]
    for job, result in zip(batched, results):  # the same masks as the job alone
        params = job.args[0]["params"]
        image = images[batched.index(job)]
        alone = segment_unsupervised(runtime_sd(), image, **{k: v for k, v in params.items() if k != "seed"})
        decoded = np.full(image.shape[:2], -1)
        for segment in result["segments"]:
            decoded[rle.decode(segment["segmentation"])] = segment["id"] - 1
        np.testing.assert_array_equal(decoded, alone.labels)
        assert job.meta["progress"]["stage"] and job.meta["params"]["sd_model"]
    assert get_queue(connection, SEGMENT_QUEUE).count == 0
    registry = get_queue(connection, SEGMENT_QUEUE).started_job_registry
    assert registry.get_job_ids() == []  # every job left the started registry


def test_without_batching_the_same_jobs_run_one_at_a_time(worker_on):
    connection, settings, run = worker_on
    images = pictures(2)
    jobs = [submit(connection, settings, image) for image in images]
    run(max_batch=1)
    results = [job.return_value() for job in jobs]
    assert len({result["timings_ms"]["unet"] for result in results}) == 2


def runtime_sd():
    from workers.engine import runtime

    return runtime.current().sd


def test_selfcross_jobs_with_the_same_classes_share_a_pass(worker_on):
    from workers.methods.textseg import segment_text

    connection, settings, run = worker_on
    images = pictures(3)
    text = {
        "classes": ["cat", "dog"],
        "method": "selfcross",
        "background": True,
        "background_words": None,
        "samples": 2,
        "timestep": 150,
        "resolution": 64,
        "gate_threshold": 0.2,
        "background_threshold": 0.5,
    }

    def submit_text(image, seed, **changes):
        entry = stored_entry(connection, settings, image)
        return enqueue(connection, settings, "text", {"params": {**text, "seed": seed, **changes}, "image": entry})

    shared = [submit_text(images[0], 5), submit_text(images[1], 9)]
    alone = submit_text(images[2], 5, classes=["tree"])  # other classes: its own pass
    run(max_batch=8)
    results = [job.return_value() for job in shared]
    assert len({result["timings_ms"]["unet"] for result in results}) == 1
    assert alone.return_value()["timings_ms"]["unet"] != results[0]["timings_ms"]["unet"]
    for job, image, result in zip(shared, images, results):
        params = {k: v for k, v in job.args[0]["params"].items() if k != "classes"}
        single = segment_text(runtime_sd(), None, image, text["classes"], **params)
        decoded = np.full(image.shape[:2], -1)
        for segment in result["segments"]:
            decoded[rle.decode(segment["segmentation"])] = segment["label_id"]
        np.testing.assert_array_equal(decoded, single.labels)
        assert result["passes"] == single.passes


def test_a_job_canceled_during_the_shared_pass_ends_alone(worker_on):
    from attnseg.queue import cancel_key

    connection, settings, run = worker_on
    images = pictures(3)
    jobs = [submit(connection, settings, image) for image in images]
    connection.set(cancel_key(jobs[1].id), 1)  # as DELETE /jobs/{id} does for a running job
    run(max_batch=8)
    for job in jobs:
        job.refresh()
    assert jobs[1].get_status() == "failed" and jobs[1].meta.get("canceled") is True
    assert [jobs[0].get_status(), jobs[2].get_status()] == ["finished", "finished"]
    assert jobs[0].return_value()["timings_ms"]["unet"] == jobs[2].return_value()["timings_ms"]["unet"]
