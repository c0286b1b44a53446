"""The service end to end: redis-server, the API over real HTTP, and tiny-random workers.

Masks from random weights mean nothing: these tests check structure and invariants (RLE round
trip through pycocotools at the original size, a partition of the image, area and bbox agreeing),
and the queue's behaviour when Redis restarts or a worker dies.
"""

import io
import json
import os
import signal
import struct
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco

from tests.support import Stack, image_bytes, raw_safetensors, safetensors_file, two_part_arrays, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("stack")).start_ready()
    yield stack
    stack.stop()


@pytest.fixture
def http(stack):
    with httpx.Client(base_url=stack.base_url, timeout=90) as client:
        yield client


def submit(http, width=300, height=200, **fields) -> dict:
    response = http.post(
        "/segment/unsupervised", files={"image": ("i.png", image_bytes(width, height), "image/png")}, data=fields
    )
    assert response.status_code == 202, response.text
    return response.json()


def wait_job(http, job_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/jobs/{job_id}", params={"wait": 10}).json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
    raise AssertionError(f"job {job_id} did not end in {timeout} s")


def decode_all(result: dict) -> list[np.ndarray]:
    masks = []
    for segment in result["segments"]:
        rle = segment["segmentation"]
        masks.append(coco.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool))
    return masks


def test_readyz_lists_the_worker_and_its_models(http):
    ready = http.get("/readyz").json()
    assert ready["ready"] is True
    worker = ready["workers"][0]
    assert worker["sd_model"] == "tiny-random" and worker["device"] == "cpu" and worker["random_weights"] is True
    assert worker["clip_model"] == "tiny-random" and worker["queues"] == ["attnseg:segment", "attnseg:train"]


def test_unsupervised_job_end_to_end(http):
    job = submit(http, 300, 200, seed="3")
    done = wait_job(http, job["id"])
    assert done["status"] == "succeeded", done
    assert done["progress"]["fraction"] == 1.0
    assert done["params"]["sd_model"] == "tiny-random" and done["params"]["seed"] == 3
    result = done["result"]
    assert result["image"] == {"id": result["image"]["id"], "width": 300, "height": 200}
    assert len(result["image"]["id"]) == 64  # the picture's SHA-256: send it as image_id to ask again
    assert result["random_weights"] is True
    assert {"queue", "inference", "encode"} <= set(result["timings_ms"])
    masks = decode_all(result)
    assert masks and all(mask.shape == (200, 300) for mask in masks)
    coverage = np.sum(masks, axis=0)
    np.testing.assert_array_equal(coverage, 1)  # the segments partition the image
    for segment, mask in zip(result["segments"], masks):
        assert segment["area"] == int(mask.sum()) > 0
        ys, xs = np.nonzero(mask)
        assert segment["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert segment["segmentation"]["size"] == [200, 300]
    assert [s["id"] for s in result["segments"]] == list(range(1, len(masks) + 1))

    overlay = http.get(f"/jobs/{job['id']}/overlay.png")
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(overlay.content)).size == (300, 200)

    metrics = http.get("/metrics").text
    assert 'attnseg_job_duration_seconds_count{kind="unsupervised",outcome="succeeded"}' in metrics
    assert 'attnseg_worker_model_busy_seconds_total{worker="' in metrics


def test_a_large_rotated_jpeg_is_decoded_small_and_masked_at_its_size(http):
    """Stored as received, decoded by the worker near the working size; masks at the upright original size."""
    from tests.test_images import jpeg

    data = jpeg(1600, 1200, orientation=6)
    job = http.post(
        "/segment/unsupervised", files={"image": ("r.jpg", data, "image/jpeg")}, data={"resolution": "256", "grid": "8"}
    ).json()
    done = wait_job(http, job["id"])
    assert done["status"] == "succeeded", done
    assert (done["result"]["image"]["width"], done["result"]["image"]["height"]) == (1200, 1600)
    masks = decode_all(done["result"])
    assert all(mask.shape == (1600, 1200) for mask in masks)
    np.testing.assert_array_equal(np.sum(masks, axis=0), 1)
    overlay = Image.open(io.BytesIO(http.get(f"/jobs/{job['id']}/overlay.png").content))
    assert overlay.size == (1200, 1600)


def test_same_seed_same_masks_and_vocabulary_names_segments(http):
    first = wait_job(http, submit(http, 120, 90, seed="5", vocabulary='["sky", "grass"]')["id"])
    second = wait_job(http, submit(http, 120, 90, seed="5", vocabulary='["sky", "grass"]')["id"])
    assert first["status"] == second["status"] == "succeeded"
    assert first["result"]["segments"] == second["result"]["segments"]
    for segment in first["result"]["segments"]:
        assert segment["label"] in ("sky", "grass")
        assert isinstance(segment["score"], float)


def test_jobs_survive_a_redis_restart(stack, http):
    stack.stop_workers()
    wait_for(lambda: stack.ready_workers() == 0, timeout=30, message="workers gone")
    jobs = [submit(http, 64, 64) for _ in range(2)]
    stack.redis.restart()  # AOF on: the queue and the job hashes come back from disk
    for job in jobs:
        assert http.get(f"/jobs/{job['id']}").json()["status"] == "queued"
    stack.start_worker()
    for job in jobs:
        assert wait_job(http, job["id"])["status"] == "succeeded"


def test_a_worker_killed_mid_job_fails_the_job_promptly(stack, http):
    worker = stack.workers[-1]
    job = submit(http, 300, 200, resolution="1024", grid="16")
    wait_for(
        lambda: http.get(f"/jobs/{job['id']}").json()["status"] == "running",
        timeout=120,
        interval=0.05,
        message="the job to start",
    )
    os.kill(worker.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    failed = wait_for(
        lambda: (j := http.get(f"/jobs/{job['id']}").json())["status"] == "failed" and j,
        timeout=120,
        interval=0.5,
        message="the job to be failed",
    )
    assert failed["error"]["code"] == "worker_lost"
    assert "worker" in failed["error"]["message"]
    assert time.monotonic() - killed_at < 120
    stack.workers.remove(worker)
    stack.start_worker()
    wait_for(lambda: stack.ready_workers() >= 1, timeout=240, message="a new worker")


def test_a_worker_told_to_stop_finishes_and_saves_its_job_first(stack, http):
    """SIGTERM (docker stop) is RQ's warm shutdown: the running job ends, its outcome (saved by the
    finishing thread) is stored, and only then does the worker withdraw."""
    worker = stack.workers[-1]
    job = submit(http, 300, 200, resolution="1024", grid="16")
    wait_for(
        lambda: http.get(f"/jobs/{job['id']}").json()["status"] == "running",
        timeout=120,
        interval=0.05,
        message="the job to start",
    )
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=120) == 0
    done = http.get(f"/jobs/{job['id']}").json()
    assert done["status"] == "succeeded" and done["result"]["segments"]
    stack.workers.remove(worker)
    stack.start_worker()
    wait_for(lambda: stack.ready_workers() >= 1, timeout=240, message="a new worker")


def test_cancel_a_running_job(stack, http):
    job = submit(http, 300, 200, resolution="1024")
    wait_for(
        lambda: http.get(f"/jobs/{job['id']}").json()["status"] == "running",
        timeout=120,
        interval=0.05,
        message="the job to start",
    )
    assert http.delete(f"/jobs/{job['id']}").status_code == 200
    ended = wait_job(http, job["id"])
    assert ended["status"] == "canceled"  # the 1024 px UNet pass outlasts the request; the next step stops
    assert ended["finished_at"] is not None and ended["result"] is None


@pytest.mark.parametrize("method", ["selfcross", "gem", "gem_refined", "cluster"])
def test_text_job_end_to_end(http, method):
    classes = ["dog", "person with clothes", "grass"]
    response = http.post(
        "/segment/text",
        files={"image": ("i.png", image_bytes(150, 100), "image/png")},
        data={"classes": json.dumps(classes), "method": method, "resolution": "256", "seed": "1"},
    )
    assert response.status_code == 202, response.text
    done = wait_job(http, response.json()["id"])
    assert done["status"] == "succeeded", done
    assert done["params"]["clip_model"] == "tiny-random"
    result = done["result"]
    assert result["labels"] == ["background", *classes]
    masks = decode_all(result)
    np.testing.assert_array_equal(np.sum(masks, axis=0), 1)  # one segment per label present: a partition
    for segment, mask in zip(result["segments"], masks):
        assert segment["label"] == result["labels"][segment["label_id"]]
        assert segment["area"] == int(mask.sum()) and isinstance(segment["score"], float)
    assert len({s["label_id"] for s in result["segments"]}) == len(result["segments"])


def two_part_example(width=128, height=96) -> tuple[bytes, bytes]:
    """`two_part_arrays` (parts 1 left and 2 right under a background band) as PNG bytes."""
    encoded = []
    for array in two_part_arrays(width, height):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded[0], encoded[1]


def train(http, epochs=15) -> dict:
    image, mask = two_part_example()
    response = http.post(
        "/oneshot/train",
        files=[("images", ("car.png", image, "image/png")), ("masks", ("car_mask.png", mask, "image/png"))],
        data={"labels": '["left", "right"]', "epochs": str(epochs), "resolution": "256", "seed": "0"},
    )
    assert response.status_code == 202, response.text
    return response.json()


def segment_with(http, model_id: str) -> dict:
    image, _ = two_part_example()
    response = http.post(
        f"/oneshot/{model_id}/segment", files={"image": ("new.png", image, "image/png")}, data={"seed": "0"}
    )
    assert response.status_code == 202, response.text
    return response.json()


def test_oneshot_train_progress_segment_and_restarts(stack, http):
    job = train(http)
    model_id = job["model_id"]
    waiting = segment_with(http, model_id)  # allowed while the model trains: it waits for it

    seen_epochs = set()

    def trained():
        view = http.get(f"/jobs/{job['id']}").json()
        if view["status"] == "running" and "epoch" in view["progress"]:
            seen_epochs.add(view["progress"]["epoch"])
            assert view["progress"]["epochs"] == 15 and view["progress"]["stage"] == "training"
        return view["status"] in ("succeeded", "failed") and view

    done = wait_for(trained, timeout=600, interval=0.2, message="training")
    assert done["status"] == "succeeded", done
    assert seen_epochs, "training progress was never reported"
    model = http.get(f"/oneshot/{model_id}").json()
    assert model["status"] == "ready" and model["sd_model"] == "tiny-random"
    assert model["labels"] == ["background", "left", "right"] and 0 <= model["metrics"]["train_iou"] <= 1

    first = wait_job(http, waiting["id"])
    assert first["status"] == "succeeded", first
    result = first["result"]
    assert result["labels"] == ["background", "left", "right"] and first["model_id"] == model_id
    masks = decode_all(result)
    assert all(mask.shape == (96, 128) for mask in masks)
    np.testing.assert_array_equal(np.sum(masks, axis=0), 1)
    for segment in result["segments"]:
        assert segment["label"] == result["labels"][segment["label_id"]]

    stack.restart_api()  # nothing about models lives in the API process
    wait_for(lambda: stack.ready_workers() >= 1, timeout=60, message="the API back")
    stack.redis.restart()  # AOF: the model's record and vectors come back
    assert http.get(f"/oneshot/{model_id}").json()["status"] == "ready"
    again = wait_job(http, segment_with(http, model_id)["id"])
    assert again["status"] == "succeeded", again
    assert again["result"]["segments"] == result["segments"]  # same seed, same masks

    assert http.delete(f"/oneshot/{model_id}").status_code == 204
    assert http.get(f"/oneshot/{model_id}").status_code == 404
    assert (
        http.post(
            f"/oneshot/{model_id}/segment", files={"image": ("x.png", two_part_example()[0], "image/png")}
        ).status_code
        == 404
    )


def test_segment_waiting_for_a_deleted_model_fails_clearly(stack, http):
    job = train(http, epochs=200)
    waiting = segment_with(http, job["model_id"])
    wait_for(
        lambda: http.get(f"/jobs/{job['id']}").json()["status"] == "running",
        timeout=120,
        interval=0.1,
        message="training to start",
    )
    assert http.delete(f"/oneshot/{job['model_id']}").status_code == 204
    assert wait_job(http, job["id"])["status"] == "canceled"
    failed = wait_job(http, waiting["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "model_deleted"


def concept_photos(count=3) -> list:
    return [("images", (f"mug{i}.png", image_bytes(64, 64, seed=i), "image/png")) for i in range(count)]


def test_concept_train_progress_export_import_referring_and_delete(stack, http):
    response = http.post(
        "/concepts/train",
        files=concept_photos(),
        data={
            "identifier": "my-mug",
            "class_word": "mug",
            "steps": "2",
            "batch_size": "1",
            "resolution": "256",
            "seed": "0",
        },
    )
    assert response.status_code == 202, response.text
    job = response.json()
    concept_id = job["concept_id"]
    scene = {"image": ("scene.png", image_bytes(128, 96, seed=5), "image/png")}
    query = {"class_word": "mug", "queries": '["a <my-mug> mug", "a red mug"]', "resolution": "256", "seed": "2"}
    waiting = http.post("/segment/referring", files=scene, data=query)  # waits for the concept's training
    assert waiting.status_code == 202, waiting.text

    seen_steps = set()

    def trained():
        view = http.get(f"/jobs/{job['id']}").json()
        if view["status"] == "running" and "step" in view["progress"]:
            seen_steps.add(view["progress"]["step"])
            assert view["progress"]["steps"] == 2
        return view["status"] in ("succeeded", "failed") and view

    done = wait_for(trained, timeout=600, interval=0.2, message="concept training")
    assert done["status"] == "succeeded", done
    # Two tiny steps can both fall inside one 0.2 s poll (and one 0.5 s progress throttle); the last
    # report is written as the job ends, so the finished job shows where training got to.
    assert done["progress"]["step"] == done["progress"]["steps"] == 2 and seen_steps <= {1, 2}
    concept = http.get(f"/concepts/{concept_id}").json()
    assert concept["status"] == "ready" and concept["method"] == "custom_diffusion" and concept["vectors"] == 1
    assert concept["sd_model"] == "tiny-random" and concept["metrics"]["steps"] == 2
    assert [c["id"] for c in http.get("/concepts").json()["concepts"]] == [concept_id]

    first = wait_job(http, waiting.json()["id"])
    assert first["status"] == "succeeded", first
    result = first["result"]
    assert result["labels"] == ["background", "a <my-mug> mug", "a red mug"] and result["instances"] >= 1
    masks = decode_all(result)
    assert all(mask.shape == (96, 128) for mask in masks)
    np.testing.assert_array_equal(np.sum(masks, axis=0), 1)  # a partition: background, queries, other instances
    labelled = [s for s in result["segments"] if s["label_id"]]
    assert all(s["label"] == result["labels"][s["label_id"]] and s["score"] is not None for s in labelled)
    assert all(s["label"] is None for s in result["segments"] if s["label_id"] is None)

    # Export, then import the same files under another identifier: the worker reads and checks them.
    exported = {name: http.get(f"/concepts/{concept_id}/files/{name}").content for name in concept["files"]}
    assert set(exported) == {"learned_embeds.safetensors", "pytorch_custom_diffusion_weights.safetensors"}
    imported = http.post(
        "/concepts/import",
        data={"identifier": "her-mug", "class_word": "mug"},
        files=[
            ("embeddings", ("learned_embeds.safetensors", exported["learned_embeds.safetensors"])),
            ("weights", ("w.safetensors", exported["pytorch_custom_diffusion_weights.safetensors"])),
        ],
    )
    assert imported.status_code == 202, imported.text
    assert wait_job(http, imported.json()["id"])["status"] == "succeeded"
    copy_id = imported.json()["concept_id"]
    copy = http.get(f"/concepts/{copy_id}").json()
    assert copy["status"] == "ready" and copy["method"] == "custom_diffusion"
    # The embedding file names the identifier it was trained with; the weights round-trip bit for bit.
    assert (
        http.get(f"/concepts/{copy_id}/files/pytorch_custom_diffusion_weights.safetensors").content
        == exported["pytorch_custom_diffusion_weights.safetensors"]
    )
    wide = http.post(
        "/concepts/import",
        data={"identifier": "wide", "class_word": "mug"},
        files={"embeddings": ("e.safetensors", safetensors_file({"<wide>": [1, 768]}))},
    )
    assert wide.status_code == 422 and "768 wide" in wide.json()["error"]["message"]
    nan = raw_safetensors(b'{"<nan>": {"dtype": "F32", "shape": [1, 32], "data_offsets": [0, 128]}}', bytes(124))
    nan += struct.pack("<f", float("nan"))  # the header is fine: the worker reads the values and refuses
    refused = http.post(
        "/concepts/import", data={"identifier": "nan", "class_word": "mug"}, files={"embeddings": ("e.st", nan)}
    )
    assert refused.status_code == 202, refused.text
    failed = wait_job(http, refused.json()["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_concept", failed
    assert "holds NaN or infinite values" in failed["error"]["message"]
    assert http.get(f"/concepts/{refused.json()['concept_id']}").json()["status"] == "failed"
    assert http.delete(f"/concepts/{refused.json()['concept_id']}").status_code == 204

    text = http.post("/segment/text", files=scene, data={"classes": '["<her-mug> mug", "table"]', "resolution": "256"})
    assert text.status_code == 202, text.text
    assert wait_job(http, text.json()["id"])["status"] == "succeeded"

    stack.restart_api()
    wait_for(lambda: stack.ready_workers() >= 1, timeout=60, message="the API back")
    stack.redis.restart()  # AOF: the concept's record and files come back
    again = wait_job(http, http.post("/segment/referring", files=scene, data=query).json()["id"])
    assert again["status"] == "succeeded", again
    assert again["result"]["segments"] == result["segments"]  # same seed, same masks

    for identifier in (concept_id, copy_id):
        assert http.delete(f"/concepts/{identifier}").status_code == 204
    assert http.get("/concepts").json()["total"] == 0
    gone = http.post("/segment/referring", files=scene, data=query)
    assert gone.status_code == 422 and "not a concept of yours" in gone.json()["error"]["message"]
