"""Text and one-shot submissions at the HTTP layer (real Redis, no worker): validation and queueing."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from attnseg import oneshot_store
from tests.support import image_bytes
from tests.test_api import queued_jobs


def post_text(client, **fields):
    return client.post("/segment/text", files={"image": ("x.png", image_bytes(), "image/png")}, data=fields)


def test_text_job_echoes_method_defaults(client):
    job = post_text(client, classes='["dog", "person with clothes"]').json()
    assert job["kind"] == "text" and job["status"] == "queued"
    assert job["params"]["classes"] == ["dog", "person with clothes"]
    assert job["params"]["method"] == "selfcross" and job["params"]["timestep"] == 150
    assert job["params"]["background"] is True and job["params"]["samples"] == 1
    assert job["params"]["gate_threshold"] == 0.2 and job["params"]["background_threshold"] == 0.5  # VOC
    coco = post_text(client, classes="cat", gate_threshold="0.5", background_threshold="0.35").json()
    assert coco["params"]["gate_threshold"] == 0.5 and coco["params"]["background_threshold"] == 0.35
    gem = post_text(client, classes="cat", method="gem_refined").json()
    assert gem["params"]["timestep"] == 100 and gem["params"]["classes"] == ["cat"]


@pytest.mark.parametrize(
    "fields,message",
    [
        ({}, "classes"),
        ({"classes": "[]"}, "classes"),
        ({"classes": '["dog", "Dog"]'}, "twice"),
        ({"classes": '["dog", "  "]'}, "classes"),
        ({"classes": json.dumps(["x" * 65])}, "classes"),
        ({"classes": json.dumps([f"c{i}" for i in range(33)])}, "classes"),
        ({"classes": '["cat, dog"]'}, "separate"),
        ({"classes": "dog", "method": "sam"}, "method"),
        ({"classes": "dog", "samples": "0"}, "samples"),
        ({"classes": "dog", "background_words": "dog"}, "repeat"),
        ({"classes": "dog", "gate_threshold": "1"}, "gate_threshold"),
        ({"classes": "dog", "background_threshold": "0"}, "background_threshold"),
    ],
)
def test_bad_class_lists_are_rejected(client, redis_server, fields, message):
    response = post_text(client, **fields)
    assert response.status_code == 422, response.text
    assert message in response.json()["error"]["message"]
    assert queued_jobs(redis_server) == 0


def mask_png(mask: np.ndarray, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(mask.astype(np.uint8), mode="L")
    (image.convert(mode) if mode != "L" else image).save(buffer, format="PNG")
    return buffer.getvalue()


def two_part_mask(width=300, height=200) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[:, : width // 2] = 1
    mask[50:150, 200:280] = 2
    return mask


def post_train(client, images, masks, **fields):
    files = [("images", (f"i{i}.png", data, "image/png")) for i, data in enumerate(images)]
    files += [("masks", (f"m{i}.png", data, "image/png")) for i, data in enumerate(masks)]
    return client.post("/oneshot/train", files=files, data=fields)


def test_train_answers_with_model_id_and_the_model_is_listed(client, redis_server):
    response = post_train(client, [image_bytes()], [mask_png(two_part_mask())], labels='["body", "wing"]', epochs="5")
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["kind"] == "oneshot_train" and job["model_id"]
    assert job["params"]["epochs"] == 5 and job["params"]["crops_per_side"] == 1
    model = client.get(f"/oneshot/{job['model_id']}").json()
    assert model["status"] == "training" and model["labels"] == ["background", "body", "wing"]
    assert model["train_job_id"] == job["id"]
    listing = client.get("/oneshot").json()
    assert listing["total"] == 1 and listing["models"][0]["id"] == job["model_id"]

    waiting = client.post(f"/oneshot/{job['model_id']}/segment", files={"image": ("x.png", image_bytes(), "image/png")})
    assert waiting.status_code == 202, waiting.text
    assert waiting.json()["status"] == "queued"
    assert waiting.json()["progress"]["stage"] == "waiting for the model's training"
    assert waiting.json()["params"]["crops_per_side"] == 1 and waiting.json()["params"]["resolution"] == 512

    assert client.delete(f"/oneshot/{job['model_id']}").status_code == 204
    assert client.get(f"/oneshot/{job['model_id']}").status_code == 404
    assert client.get(f"/jobs/{job['id']}").json()["status"] == "canceled"


def test_palette_and_grey_rgb_masks_are_accepted(client):
    mask = two_part_mask()
    palette = Image.fromarray(mask, mode="L").convert("P")
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    assert post_train(client, [image_bytes()], [buffer.getvalue()], labels='["a", "b"]').status_code == 202
    assert post_train(client, [image_bytes()], [mask_png(mask, "RGB")], labels='["a", "b"]').status_code == 202


def colour_mask() -> bytes:
    pixels = np.zeros((200, 300, 3), np.uint8)
    pixels[:, :150] = (255, 0, 0)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_TRAINING = [
    ("count mismatch", lambda: ([image_bytes(), image_bytes()], [mask_png(two_part_mask())]), {}, "2 images but 1"),
    ("no images", lambda: ([], []), {}, "images"),
    ("size mismatch", lambda: ([image_bytes()], [mask_png(two_part_mask(100, 80))]), {}, "m0.png"),
    ("value out of range", lambda: ([image_bytes()], [mask_png(two_part_mask() * 2)]), {}, "class ids [4]"),
    ("no part pixel", lambda: ([image_bytes()], [mask_png(np.zeros((200, 300)))]), {}, "no part pixel"),
    ("colour mask", lambda: ([image_bytes()], [colour_mask()]), {}, "colour"),
    ("mask not png", lambda: ([image_bytes()], [image_bytes(fmt="JPEG")]), {}, "PNG"),
    ("image not an image", lambda: ([b"nope"], [mask_png(two_part_mask())]), {}, "i0.png"),
    (
        "too many labels",
        lambda: ([image_bytes()], [mask_png(two_part_mask())]),
        {"labels": json.dumps([f"p{i}" for i in range(32)])},
        "labels",
    ),
    (
        "part without pixels",
        lambda: ([image_bytes()], [mask_png(two_part_mask())]),
        {"labels": '["body", "wing", "tail"]'},
        "'tail' (id 3)",
    ),
    ("epochs", lambda: ([image_bytes()], [mask_png(two_part_mask())]), {"epochs": "0"}, "epochs"),
    ("crops", lambda: ([image_bytes()], [mask_png(two_part_mask())]), {"crops_per_side": "3"}, "crops_per_side"),
]


@pytest.mark.parametrize("name,files,fields,message", BAD_TRAINING, ids=[c[0] for c in BAD_TRAINING])
def test_bad_training_uploads_are_rejected_and_nothing_is_stored(client, redis_server, name, files, fields, message):
    images, masks = files()
    response = post_train(client, images, masks, **{"labels": '["body", "wing"]', **fields})
    assert response.status_code in (415, 422), response.text
    assert message in response.json()["error"]["message"]
    assert redis_server.client().keys("*") == []  # no picture, model record or job: refused before storage


def test_unknown_model_is_404(client):
    assert client.get("/oneshot/nope").status_code == 404
    assert client.delete("/oneshot/nope").status_code == 404
    response = client.post("/oneshot/nope/segment", files={"image": ("x.png", image_bytes(), "image/png")})
    assert response.status_code == 404 and "nope" in response.json()["error"]["message"]


def test_segment_with_a_failed_model_is_409(client, redis_server):
    connection = redis_server.client()
    oneshot_store.create(
        connection,
        "m1",
        tenant="default",
        labels=["a"],
        params={"crops_per_side": 1, "resolution": 512},
        train_job_id="gone",
    )
    oneshot_store.update(connection, "m1", status="failed", error={"code": "x", "message": "it broke"})
    response = client.post("/oneshot/m1/segment", files={"image": ("x.png", image_bytes(), "image/png")})
    assert response.status_code == 409 and "it broke" in response.json()["error"]["message"]
