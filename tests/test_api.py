"""The HTTP layer against a real Redis, without a worker: validation, errors, queueing, jobs."""

import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from attnseg.images import load_image
from attnseg.queue import QUEUES, cancel_key, get_queue
from tests.support import image_bytes


def queued_jobs(redis_server) -> int:
    connection = redis_server.client()
    return sum(get_queue(connection, name).count for name in QUEUES)


def post_image(client, data: bytes, **fields):
    return client.post("/segment/unsupervised", files={"image": ("x.png", data, "image/png")}, data=fields)


def png_with_declared_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height: a decompression bomb as far as a decoder knows."""
    data = bytearray(image_bytes(4, 4))
    ihdr = 8 + 8  # signature, then length + "IHDR"
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def test_health_and_not_ready_without_workers(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["redis"] is True and ready.json()["workers"] == []


def test_submit_queues_a_job_with_defaults_echoed(client, redis_server):
    response = post_image(client, image_bytes(), kl_threshold="0.8")
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/jobs/{job['id']}"
    assert job["status"] == "queued" and job["kind"] == "unsupervised"
    params = job["params"]
    assert params["kl_threshold"] == 0.8 and params["grid"] == 16 and params["timestep"] == 300
    assert params["iterations"] == 3 and params["resolution"] == 512 and params["refine"] is False
    assert isinstance(params["seed"], int)
    assert job["expires_at"] is not None
    assert queued_jobs(redis_server) == 1
    assert client.get(f"/jobs/{job['id']}").json()["status"] == "queued"


def test_json_base64_submission(client):
    body = {"image_base64": base64.b64encode(image_bytes(fmt="JPEG")).decode(), "seed": 7, "vocabulary": ["sky"]}
    response = client.post("/segment/unsupervised", json=body)
    assert response.status_code == 202, response.text
    assert response.json()["params"]["seed"] == 7
    assert response.json()["params"]["vocabulary"] == ["sky"]


def test_form_lists_accept_repeats_and_json(client):
    repeated = client.post(
        "/segment/unsupervised",
        files=[
            ("image", ("a.png", image_bytes(), "image/png")),
            ("vocabulary", (None, "sky")),
            ("vocabulary", (None, "tree")),
        ],
    )
    assert repeated.status_code == 202, repeated.text
    assert repeated.json()["params"]["vocabulary"] == ["sky", "tree"]
    as_json = post_image(client, image_bytes(), vocabulary='["sky", "tree"]')
    assert as_json.json()["params"]["vocabulary"] == ["sky", "tree"]


def test_webp_accepted_and_format_sniffed_from_bytes(client):
    response = client.post("/segment/unsupervised", files={"image": ("lies.gif", image_bytes(fmt="WEBP"), "image/gif")})
    assert response.status_code == 202, response.text


def test_cancel_a_queued_job(client, redis_server):
    job = post_image(client, image_bytes()).json()
    canceled = client.delete(f"/jobs/{job['id']}")
    assert canceled.status_code == 200
    assert canceled.json()["status"] == "canceled"
    assert canceled.json()["finished_at"] is not None and canceled.json()["expires_at"] is not None
    assert queued_jobs(redis_server) == 0
    # A worker may be taking the job off the queue as it is canceled: the stop flag it checks at
    # its first progress report is set too, so it never runs to the end under a "canceled" job.
    assert redis_server.client().exists(cancel_key(job["id"]))


BAD_INPUTS = [
    ("not an image", lambda: post_image(client_ref[0], b"hello, this is text"), 415, "unsupported_media_type"),
    ("gif", lambda: post_image(client_ref[0], b"GIF89a" + b"\0" * 100), 415, "unsupported_media_type"),
    ("truncated png", lambda: post_image(client_ref[0], image_bytes()[:300]), 400, "invalid_image"),
    # checked at 1/8 scale (pixels=False), which still reads every block: the missing tail is found
    (
        "truncated jpeg",
        lambda: post_image(client_ref[0], image_bytes(400, 300, fmt="JPEG")[:-40]),
        400,
        "invalid_image",
    ),
    (
        "decompression bomb",
        lambda: post_image(client_ref[0], png_with_declared_size(60000, 60000)),
        413,
        "image_too_large",
    ),
    (
        "over pixel limit",
        lambda: post_image(client_ref[0], image_bytes(1100, 1000, fmt="JPEG")),
        413,
        "image_too_large",
    ),
    ("oversized body", lambda: post_image(client_ref[0], b"\xff\xd8\xff" + b"0" * 2_100_000), 413, "payload_too_large"),
    (
        "threshold out of range",
        lambda: post_image(client_ref[0], image_bytes(), kl_threshold="-1"),
        422,
        "invalid_field",
    ),
    (
        "threshold not a number",
        lambda: post_image(client_ref[0], image_bytes(), kl_threshold="high"),
        422,
        "invalid_field",
    ),
    ("grid too large", lambda: post_image(client_ref[0], image_bytes(), grid="65"), 422, "invalid_field"),
    (
        "grid over latent side",
        lambda: post_image(client_ref[0], image_bytes(), grid="40", resolution="256"),
        422,
        "invalid_field",
    ),
    (
        "resolution not multiple of 64",
        lambda: post_image(client_ref[0], image_bytes(), resolution="500"),
        422,
        "invalid_field",
    ),
    ("unknown field", lambda: post_image(client_ref[0], image_bytes(), kl_treshold="1"), 422, "invalid_field"),
    (
        "duplicate vocabulary",
        lambda: post_image(client_ref[0], image_bytes(), vocabulary='["sky","Sky"]'),
        422,
        "invalid_field",
    ),
    (
        "no image",
        lambda: client_ref[0].post("/segment/unsupervised", files=[("grid", (None, "16"))]),
        422,
        "invalid_field",
    ),
    (
        "form without multipart",
        lambda: client_ref[0].post("/segment/unsupervised", data={"grid": "16"}),
        415,
        "unsupported_media_type",
    ),
    (
        "two images",
        lambda: client_ref[0].post(
            "/segment/unsupervised",
            files=[("image", ("a.png", image_bytes(), "image/png")), ("image", ("b.png", image_bytes(), "image/png"))],
        ),
        422,
        "invalid_field",
    ),
    (
        "bad base64",
        lambda: client_ref[0].post("/segment/unsupervised", json={"image_base64": "%%%"}),
        422,
        "invalid_field",
    ),
    ("json not object", lambda: client_ref[0].post("/segment/unsupervised", json=[1, 2]), 400, "invalid_json"),
    (
        "broken json",
        lambda: client_ref[0].post("/segment/unsupervised", content=b"{", headers={"content-type": "application/json"}),
        400,
        "invalid_json",
    ),
    (
        "wrong content type",
        lambda: client_ref[0].post("/segment/unsupervised", content=b"abc", headers={"content-type": "text/plain"}),
        415,
        "unsupported_media_type",
    ),
]
client_ref: list = []


@pytest.mark.parametrize("name,request_fn,status,code", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_rejected_clearly_and_nothing_is_queued(client, redis_server, name, request_fn, status, code):
    client_ref[:] = [client]
    response = request_fn()
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert len(error["message"]) > 10
    assert queued_jobs(redis_server) == 0
    assert redis_server.client().keys("attnseg:image:*") == [] or status == 429


def test_error_messages_name_the_field_and_limit(client):
    error = post_image(client, image_bytes(), kl_threshold="-1").json()["error"]
    assert error["field"] == "kl_threshold" and "kl_threshold" in error["message"]
    error = post_image(client, image_bytes(1100, 1000, fmt="JPEG")).json()["error"]
    assert "1000000" in error["message"]


def test_unknown_job_is_404(client):
    for path in ("/jobs/nope", "/jobs/nope/overlay.png"):
        response = client.get(path)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
    assert client.delete("/jobs/nope").status_code == 404


def test_wait_returns_after_the_deadline_for_an_unfinished_job(client):
    job = post_image(client, image_bytes()).json()
    assert client.get(f"/jobs/{job['id']}?wait=0.5").json()["status"] == "queued"
    assert client.get(f"/jobs/{job['id']}?wait=61").status_code == 422


def test_overlay_of_an_unfinished_job_is_409(client):
    job = post_image(client, image_bytes()).json()
    assert client.get(f"/jobs/{job['id']}/overlay.png").status_code == 409


def test_full_queue_answers_429_with_retry_after(make_client, redis_server):
    client = make_client(max_queued_jobs=2)
    for _ in range(2):
        assert post_image(client, image_bytes()).status_code == 202
    response = post_image(client, image_bytes())
    assert response.status_code == 429
    assert response.headers["retry-after"] == "30"
    assert queued_jobs(redis_server) == 2


def test_api_key_required_when_configured(make_client):
    client = make_client(api_key="s3cret")
    assert post_image(client, image_bytes()).status_code == 401
    authorised = client.post(
        "/segment/unsupervised",
        files={"image": ("x.png", image_bytes(), "image/png")},
        headers={"Authorization": "Bearer s3cret"},
    )
    assert authorised.status_code == 202
    assert client.get("/healthz").status_code == 200


def test_exif_orientation_is_applied(client, redis_server):
    pixels = np.zeros((20, 40, 3), np.uint8)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90: the upright image is 20 wide, 40 high
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    job = post_image(client, buffer.getvalue()).json()
    assert job["status"] == "queued"
    payload = get_queue(redis_server.client(), QUEUES[0]).fetch_job(job["id"]).args[0]
    assert (payload["image"]["width"], payload["image"]["height"]) == (20, 40)  # upright, for the masks
    stored = redis_server.client().get(payload["image"]["key"])
    assert stored == buffer.getvalue()  # kept as received: the worker applies the orientation
    assert load_image(redis_server.client(), payload["image"]["key"]).shape == (40, 20, 3)


def test_metrics_expose_requests_and_queue_depth(client):
    post_image(client, image_bytes())
    text = client.get("/metrics").text
    assert 'attnseg_http_requests_total{method="POST",route="/segment/unsupervised",status="202"}' in text
    assert 'attnseg_queue_depth{queue="attnseg:segment"} 1.0' in text
    assert "attnseg_workers_ready 0.0" in text


def test_openapi_document_is_checked_in_and_current(client):
    from pathlib import Path

    checked_in = json.loads((Path(__file__).parents[1] / "openapi" / "openapi.json").read_text())
    assert checked_in == client.app.openapi(), "run: attnseg openapi -o openapi/openapi.json"


def test_the_api_never_imports_torch():
    """The API image has no torch: building the app and its OpenAPI must not pull it in."""
    import subprocess
    import sys

    code = (
        "import sys; from service.app import create_app; create_app().openapi(); "
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'open_clip') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_validator_message_names_its_field_once_without_pydantic_prefix(client):
    response = client.post(
        "/segment/text", files={"image": ("p.png", image_bytes(), "image/png")}, data={"classes": ["dog.cat", "grass"]}
    )
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert message.startswith("classes[0]: 'dog.cat' contains") and "Value error" not in message, message
