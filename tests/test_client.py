"""`attnseg.client`: request/response rules on a mock transport, then every method against the real
stack (Redis, the API over HTTP, a tiny-random worker)."""

from __future__ import annotations

import asyncio
import io
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco

from attnseg.client import (
    AsyncClient,
    Client,
    InvalidRequest,
    JobCanceled,
    NotFound,
    QueueFull,
    ServerError,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
    WaitTimeout,
    protocol,
)
from attnseg.client.inputs import StoredPicture, file_part
from attnseg.client.results import JobState, Result, segmentation_result
from tests.support import image_bytes, two_part_arrays

JOB = {
    "id": "j1",
    "kind": "unsupervised",
    "status": "queued",
    "progress": {"stage": "queued", "fraction": 0.0},
    "created_at": "2026-12-01T10:00:00Z",
    "started_at": None,
    "finished_at": None,
    "expires_at": "2026-12-02T10:00:00Z",
    "params": {},
    "result": None,
    "error": None,
}


def error(status: int, code: str, message: str, field: str | None = None, **headers) -> httpx.Response:
    body = {"code": code, "message": message, **({"field": field} if field else {})}
    return httpx.Response(status, json={"error": body}, headers=headers)


def drive(operation, responses):
    """Run a protocol operation by hand: its steps, with `responses` answering its calls in turn."""
    steps, reply = [], None
    answers = iter(responses)
    try:
        while True:
            step = operation.send(reply)
            steps.append(step)
            reply = next(answers) if isinstance(step, protocol.Call) else None
    except StopIteration as done:
        return steps, done.value


# -- the request/response layer, without a server ------------------------------------------------


def test_retry_after_seconds_and_dates_are_honoured_and_bounded():
    call = protocol.job_call("j1")
    in_a_minute = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=50), usegmt=True)
    steps, response = drive(
        protocol.request(call, retries=3),
        [
            error(429, "queue_full", "full", **{"Retry-After": "30"}),
            error(503, "unavailable", "down", **{"Retry-After": in_a_minute}),
            error(503, "unavailable", "down"),
            httpx.Response(200, json=JOB),
        ],
    )
    sleeps = [step.seconds for step in steps if isinstance(step, protocol.Sleep)]
    assert sleeps[0] == 30.0
    assert 40 < sleeps[1] <= 50  # an HTTP date: the time until then
    assert sleeps[2] == protocol.BACKOFF_S * 4  # no header: backoff doubling per attempt (third retry)
    assert response.json() == JOB
    too_long = error(429, "queue_full", "x", **{"Retry-After": "3600"})
    assert protocol.retry_delay(too_long, 0) == protocol.MAX_RETRY_AFTER_S


def test_the_client_retries_a_full_queue_then_raises_queue_full_with_the_api_fields():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return error(
            429, "queue_full", "the attnseg:segment queue is full (200 jobs); retry later", **{"Retry-After": "0"}
        )

    with Client("http://api", api_key="k3y", retries=2, transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(QueueFull) as raised:
            client.segment_unsupervised(image_bytes(32, 32))
    assert len(seen) == 3  # the first try and two retries
    assert all(r.headers["authorization"] == "Bearer k3y" for r in seen)
    assert raised.value.status == 429 and raised.value.code == "queue_full" and raised.value.retry_after == 0
    assert "queue is full" in raised.value.message


def test_async_client_retries_then_succeeds():
    answers = [
        error(503, "unavailable", "the job store (Redis) is unavailable", **{"Retry-After": "0"}),
        httpx.Response(202, json=JOB),
    ]

    async def handler(request: httpx.Request) -> httpx.Response:
        return answers.pop(0)

    async def main():
        async with AsyncClient("http://api", transport=httpx.MockTransport(handler)) as client:
            return await client.segment_unsupervised(image_bytes(32, 32))

    job = asyncio.run(main())
    assert job.id == "j1" and job.status == "queued" and not answers


def test_exhausted_retries_and_other_statuses_are_typed():
    responses = {
        "/jobs/down": error(503, "unavailable", "down", **{"Retry-After": "0"}),
        "/jobs/locked": error(401, "unauthorized", "missing or wrong API key"),
        "/jobs/proxy": httpx.Response(502, text="Bad Gateway"),
    }
    transport = httpx.MockTransport(lambda request: responses[request.url.path])
    with Client("http://api", retries=1, transport=transport) as client:
        with pytest.raises(Unavailable):
            client.job("down")
        with pytest.raises(Unauthorized) as raised:
            client.job("locked")
        assert raised.value.code == "unauthorized"
        with pytest.raises(ServerError) as raised:
            client.job("proxy")
        assert raised.value.code == "http_502" and raised.value.message == "Bad Gateway"


def test_form_fields_and_image_inputs():
    assert protocol.form_fields({"vocabulary": ["sky", "tree"], "refine": True, "seed": 3, "grid": None}) == {
        "vocabulary": '["sky", "tree"]',
        "refine": "true",
        "seed": "3",
    }
    pixels = np.zeros((4, 6, 3), np.uint8)
    name, data, _ = file_part(pixels, "image")
    assert name == "image.png" and Image.open(io.BytesIO(data)).size == (6, 4)
    _, data, _ = file_part(np.array([[0, 2], [1, 1]], dtype=np.int64), "mask", mask=True)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), [[0, 2], [1, 1]])
    with pytest.raises(TypeError, match="uint8"):
        file_part(pixels.astype(np.float32), "image")
    with pytest.raises(TypeError, match="PIL image"):
        file_part(3, "image")


def test_a_result_names_its_picture_and_a_segment_call_sends_it_as_its_id():
    picture_id = "ab" * 32
    result = Result.from_api({"image": {"id": picture_id, "width": 4, "height": 3}, "segments": []})
    assert result.picture == StoredPicture(picture_id)
    calls = [
        protocol.unsupervised_call(result.picture, {}),
        protocol.text_call(result.picture, ["dog"], "selfcross", {}),
        protocol.referring_call(result.picture, "mug", ["a red mug"], {}),
        protocol.oneshot_segment_call("m1", result.picture, {}),
    ]
    assert all(call.files == [("image_id", (None, picture_id))] for call in calls)  # a field, not a file
    request = httpx.Request("POST", "http://api/segment/text", data=calls[1].data, files=calls[1].files)
    assert request.headers["content-type"].startswith("multipart/form-data")  # the API reads no other form
    older = Result.from_api({"image": {"width": 4, "height": 3}, "segments": []})
    with pytest.raises(ValueError, match="send the picture again"):
        _ = older.picture


def test_a_training_job_has_no_segmentation_result():
    training = JobState.from_api(
        {**JOB, "kind": "oneshot_train", "status": "succeeded", "model_id": "m1", "result": {"model_id": "m1"}}
    )
    with pytest.raises(TypeError, match="oneshot_model"):
        segmentation_result(training)


def test_concept_calls_and_a_concept_job_has_no_segmentation_result():
    call = protocol.concept_train_call(
        [image_bytes(32, 32), image_bytes(32, 32, seed=1)],
        "my-mug",
        "mug",
        [np.ones((32, 32), bool)] * 2,
        {"steps": 2, "train_kv": False},
    )
    assert [name for name, _ in call.files] == ["images", "images", "masks", "masks"]
    assert call.data == {"identifier": "my-mug", "class_word": "mug", "steps": "2", "train_kv": "false"}
    referring = protocol.referring_call(image_bytes(32, 32), "mug", "<my-mug> mug", {})
    assert referring.path == "/segment/referring" and referring.data["queries"] == '["<my-mug> mug"]'
    training = JobState.from_api(
        {**JOB, "kind": "concept_train", "status": "succeeded", "concept_id": "c1", "result": {"concept_id": "c1"}}
    )
    with pytest.raises(TypeError, match="client.concept"):
        segmentation_result(training)


def test_a_referring_label_map_numbers_the_other_instances_after_the_labels():
    def segment(id_, rows, label_id):
        mask = np.zeros((4, 4), np.uint8)
        mask[rows] = 1
        rle = coco.encode(np.asfortranarray(mask))
        return {
            "id": id_,
            "label": None if label_id is None else "q",
            "label_id": label_id,
            "score": None,
            "area": int(mask.sum()),
            "bbox": [0, 0, 4, 1],
            "segmentation": {"size": [4, 4], "counts": rle["counts"].decode()},
        }

    body = {
        "image": {"width": 4, "height": 4},
        "labels": ["background", "<my-mug> mug", "a red mug"],
        "segments": [segment(1, 0, 0), segment(2, 1, 2), segment(3, 2, None), segment(4, 3, None)],
    }
    np.testing.assert_array_equal(Result.from_api(body).label_map()[:, 0], [0, 2, 3, 4])


# -- against the real stack ----------------------------------------------------------------------


@pytest.fixture
def client(shared_stack):
    with Client(shared_stack.base_url, timeout=60) as client:
        yield client


def assert_consistent(result, width: int, height: int) -> None:
    """Masks decode at the picture's size, equal pycocotools' decoding of the same RLE, agree with area
    and bbox, and cover each pixel once; label_map() paints them."""
    assert (result.width, result.height) == (width, height) and result.random_weights
    label_map = result.label_map()
    coverage = np.zeros((height, width), int)
    for segment in result.segments:
        reference = coco.decode({"size": segment.rle["size"], "counts": segment.rle["counts"].encode()}).astype(bool)
        np.testing.assert_array_equal(segment.mask, reference)
        assert segment.mask.dtype == bool and segment.area == int(segment.mask.sum())
        ys, xs = np.nonzero(segment.mask)
        assert segment.bbox == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
        if segment.label_id is not None or result.labels is None:
            expected = segment.id if segment.label_id is None else segment.label_id
            assert (label_map[segment.mask] == expected).all()
        else:  # a referring result's other instances: numbered after the labels
            assert (label_map[segment.mask] >= len(result.labels)).all()
        coverage += segment.mask
    np.testing.assert_array_equal(coverage, 1)


@pytest.mark.slow
def test_unsupervised_from_every_input_type(client, tmp_path):
    data = image_bytes(96, 64)
    path = tmp_path / "picture.png"
    path.write_bytes(data)
    picture = Image.open(io.BytesIO(data))
    inputs = {"path": path, "str": str(path), "bytes": data, "pil": picture, "array": np.asarray(picture)}
    jobs = {
        name: client.segment_unsupervised(value, resolution=256, seed=7, vocabulary=["sky", "grass"])
        for name, value in inputs.items()
    }
    grey = client.segment_unsupervised(np.asarray(picture.convert("L")), resolution=256, seed=7)
    results = {name: job.result(timeout=300) for name, job in jobs.items()}
    for result in results.values():
        assert_consistent(result, 96, 64)
        assert all(segment.label in ("sky", "grass") for segment in result.segments)
        assert results["path"].segments == result.segments  # every input type sends the same pixels
    assert jobs["path"].status == "succeeded" and jobs["path"].state.params["seed"] == 7
    assert_consistent(grey.result(timeout=300), 96, 64)


@pytest.mark.slow
def test_a_second_question_sends_only_the_pictures_id(client, shared_stack):
    first = client.segment_text(image_bytes(80, 60, seed=9), ["dog"], seed=4).result(timeout=300)
    again = client.segment_text(first.picture, ["dog"], seed=4).result(timeout=300)
    assert again.image_id == first.image_id and again.segments == first.segments
    assert "fetch" not in again.timings_ms  # the worker kept the picture's latents

    async def ask_async():
        async with AsyncClient(shared_stack.base_url) as aclient:
            return await (await aclient.segment_unsupervised(first.picture, resolution=256)).result(timeout=300)

    assert_consistent(asyncio.run(ask_async()), 80, 60)


@pytest.mark.slow
def test_text_with_progress_and_the_overlay(client):
    seen = []
    job = client.segment_text(image_bytes(80, 60), ["dog", "grass"], method="gem", seed=1)
    assert job.state.kind == "text" and job.state.params["method"] == "gem"
    job.wait(timeout=300, on_progress=seen.append)
    assert seen and seen[-1].fraction == 1.0 and job.status == "succeeded"
    result = job.result()
    assert result.labels == ["background", "dog", "grass"]
    assert_consistent(result, 80, 60)
    for segment in result.segments:
        assert segment.label == result.labels[segment.label_id] and isinstance(segment.score, float)
    assert set(np.unique(result.label_map())) <= {0, 1, 2}
    overlay = Image.open(io.BytesIO(job.overlay()))
    assert overlay.format == "PNG" and overlay.size == (80, 60)


@pytest.mark.slow
def test_async_client_runs_jobs_concurrently(shared_stack):
    async def main():
        async with AsyncClient(shared_stack.base_url) as client:
            jobs = await asyncio.gather(
                client.segment_unsupervised(image_bytes(64, 48, seed=1), resolution=256),
                client.segment_text(image_bytes(64, 48, seed=2), ["sky"], method="gem"),
            )
            again = await client.job(jobs[0].id)
            with pytest.raises(NotFound):
                await client.oneshot_model("no-such-model")
            with pytest.raises(NotFound):
                await client.concept("no-such-concept")
            assert isinstance(await client.concepts(), list)
            return await asyncio.gather(*(job.result(timeout=300) for job in jobs)), again

    (unsupervised, text), again = asyncio.run(main())
    assert_consistent(unsupervised, 64, 48)
    assert_consistent(text, 64, 48)
    assert text.labels == ["background", "sky"] and again.state.kind == "unsupervised"


@pytest.mark.slow
def test_oneshot_train_wait_and_segment(client):
    pixels, mask = two_part_arrays()
    model = client.train_oneshot(pixels, mask, ["left", "right"], epochs=2, resolution=256, seed=0)
    assert model.status == "training" and model.labels == ["background", "left", "right"]
    early = model.segment(Image.fromarray(pixels))  # allowed while it trains: the job waits for it
    progress = []
    assert model.wait(timeout=600, on_progress=progress.append) is model
    assert model.status == "ready" and 0 <= model.metrics["train_iou"] <= 1
    epochs = [p for p in progress if p.epoch is not None]
    assert epochs and epochs[-1].epochs == 2 and all(p.loss is not None and p.best_iou is not None for p in epochs)
    assert client.oneshot_model(model.id).status == "ready"
    for job in (early, model.segment(pixels, seed=0)):
        result = job.result(timeout=300)
        assert job.state.model_id == model.id and result.labels == ["background", "left", "right"]
        assert_consistent(result, 96, 64)
    model.delete()
    with pytest.raises(NotFound):
        client.oneshot_model(model.id)


@pytest.mark.slow
def test_job_cancel_and_wait_timeout(client):
    job = client.segment_unsupervised(image_bytes(300, 200), resolution=1024)
    with pytest.raises(WaitTimeout):
        job.wait(timeout=0.01)
    assert client.job(job.id).status in ("queued", "running")
    assert job.cancel().status in ("canceled", "running")  # a running one stops at its next step
    with pytest.raises(JobCanceled) as raised:
        job.wait(timeout=300)
    assert raised.value.job_id == job.id and job.status == "canceled"


@pytest.mark.slow
def test_api_errors_are_typed_with_code_and_field(client):
    with pytest.raises(NotFound) as raised:
        client.job("no-such-job")
    assert (raised.value.status, raised.value.code, raised.value.field) == (404, "not_found", "job_id")
    with pytest.raises(InvalidRequest) as raised:
        client.segment_unsupervised(image_bytes(32, 32), grid=100)
    assert raised.value.status == 422 and raised.value.field == "grid" and "grid" in raised.value.message
    with pytest.raises(InvalidRequest) as raised:
        client.segment_text(image_bytes(32, 32), ["dog"], method="nope")
    assert raised.value.field == "method"
    with pytest.raises(UnsupportedMediaType) as raised:
        client.segment_unsupervised(b"this is not a picture")
    assert raised.value.status == 415
    with pytest.raises(NotFound):
        client.oneshot_segment("no-such-model", image_bytes(32, 32))


@pytest.mark.slow
def test_concept_train_referring_export_import_and_delete(client):
    photos = [image_bytes(64, 64, seed=i) for i in range(3)]
    masks = [np.pad(np.ones((40, 40), bool), 12)] * 3  # the object in the middle of each photo
    concept = client.train_concept(
        photos, "client-mug", "mug", masks=masks, steps=2, batch_size=1, resolution=256, seed=0
    )
    assert concept.status == "training" and concept.query == "<client-mug> mug"
    scene = image_bytes(128, 96, seed=5)
    early = client.segment_referring(scene, "mug", [concept.query, "a red mug"], resolution=256, seed=2)  # waits
    assert concept.wait(timeout=600) is concept
    assert concept.status == "ready" and concept.state.method == "custom_diffusion"
    assert concept.state.metrics["steps"] == 2 and concept.id in [c.id for c in client.concepts()]
    result = early.result(timeout=300)
    assert result.labels == ["background", "<client-mug> mug", "a red mug"]
    assert_consistent(result, 128, 96)

    files = {name: concept.file(name) for name in concept.state.files}
    copy = client.import_concept(
        "client-mug-copy",
        "mug",
        files["learned_embeds.safetensors"],
        files["pytorch_custom_diffusion_weights.safetensors"],
    ).wait(timeout=300)
    assert copy.status == "ready" and copy.state.method == "custom_diffusion"
    assert (
        copy.file("pytorch_custom_diffusion_weights.safetensors")
        == files["pytorch_custom_diffusion_weights.safetensors"]
    )
    text = client.segment_text(scene, [copy.query, "table"], resolution=256).result(timeout=300)
    assert text.labels == ["background", "<client-mug-copy> mug", "table"]
    for gone in (copy, concept):
        gone.delete()
        with pytest.raises(NotFound):
            client.concept(gone.id)
