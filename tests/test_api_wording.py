"""What a user reads from the API: one job id shape, a job's own parameters only, and errors in the
user's terms (the field as they wrote it, every bad entry, no internal names)."""

import base64
import json
import re

import numpy as np
import pytest

from tests.support import image_bytes
from tests.test_api_concepts import train as train_concept
from tests.test_api_text_oneshot import mask_png, post_text, post_train, two_part_mask

HEX32 = re.compile(r"[0-9a-f]{32}")


def test_every_job_id_is_32_hex_digits(client):
    unsupervised = client.post("/segment/unsupervised", files={"image": ("x.png", image_bytes(), "image/png")}).json()
    text = post_text(client, classes="dog").json()
    oneshot = post_train(client, [image_bytes()], [mask_png(two_part_mask())], labels='["body", "wing"]').json()
    concept = train_concept(client).json()
    for job in (unsupervised, text, oneshot, concept):
        assert HEX32.fullmatch(job["id"]), job["id"]
        assert client.get(f"/jobs/{job['id']}").status_code == 200


@pytest.mark.parametrize("method", ["gem", "gem_refined", "cluster"])
def test_a_gem_job_echoes_only_its_own_parameters(client, method):
    params = post_text(client, classes="dog", method=method).json()["params"]
    assert not {"samples", "gate_threshold", "background_threshold", "background_words"} & set(params)
    assert ("timestep" in params) == (method != "gem")  # gem has no SD pass
    assert params["classes"] == ["dog"] and params["method"] == method


def test_a_selfcross_parameter_given_to_gem_is_refused_not_ignored(client):
    response = post_text(client, classes="dog", method="gem", samples="3")
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "samples" and error["message"] == "samples: not used by method 'gem' (selfcross only)"


def test_every_bad_class_is_named_as_the_user_wrote_it(client):
    response = post_text(client, classes=json.dumps(["dog.cat", "x" * 65]))
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "classes[0]"
    assert error["message"] == (
        "classes[0]: 'dog.cat' contains ',' or '.', which separate words in the prompt; "
        "classes[1]: at most 64 characters"
    )


def test_a_json_mask_of_the_wrong_size_is_named_without_internal_names(client):
    body = {
        "images_base64": [base64.b64encode(image_bytes(451, 300)).decode()],
        "masks_base64": [base64.b64encode(mask_png(np.ones((512, 512), np.uint8))).decode()],
        "labels": ["body"],
    }
    error = client.post("/oneshot/train", json=body).json()["error"]
    assert error["message"] == "masks[0] is 512x512 but its image is 451x300; a mask must have its image's size"
    assert error["field"] == "masks[0]"


def test_a_multipart_mask_is_named_with_its_file(client):
    response = post_train(client, [image_bytes(451, 300)], [mask_png(np.ones((512, 512), np.uint8))], labels="body")
    assert response.json()["error"]["message"].startswith("masks[0] (m0.png) is 512x512 but its image is 451x300")


def test_too_few_concept_photos_are_counted_in_the_users_words(client):
    error = train_concept(client, count=1).json()["error"]
    assert error["message"] == "give 3 to 20 photos of the object, got 1"


def test_readyz_says_what_the_key_sent_is_worth(make_client):
    client = make_client(api_keys="alice:k-alice", admin_keys="op-1")
    said = {
        name: client.get("/readyz", headers=headers).json()["key"]
        for name, headers in {
            "none": {},
            "wrong": {"Authorization": "Bearer nope"},
            "tenant": {"Authorization": "Bearer k-alice"},
            "operator": {"Authorization": "Bearer op-1"},
        }.items()
    }
    assert said == {"none": "missing", "wrong": "refused", "tenant": "accepted", "operator": "accepted"}
    assert make_client().get("/readyz").json()["key"] == "not_needed"
