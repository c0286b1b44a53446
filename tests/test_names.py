"""Trained models and concepts carry a name (and an optional description) that people tell them
apart by: accepted at training and import, stored, and shown wherever they are listed."""

import pytest

from attnseg.concept_files import EMBEDDINGS_FILE
from tests.support import image_bytes, safetensors_file
from tests.test_api_concepts import photos
from tests.test_api_text_oneshot import mask_png, post_train, two_part_mask


def train_model(client, **fields):
    response = post_train(client, [image_bytes()], [mask_png(two_part_mask())], labels='["body", "wing"]', **fields)
    assert response.status_code == 202, response.text
    return response.json()["model_id"]


def test_a_one_shot_model_keeps_its_name_and_description(client):
    model_id = train_model(client, name="  Planes, side view ", description="two parts from one photo")
    model = client.get(f"/oneshot/{model_id}").json()
    assert model["name"] == "Planes, side view" and model["description"] == "two parts from one photo"
    listed = client.get("/oneshot").json()["models"]
    assert [(m["id"], m["name"]) for m in listed] == [(model_id, "Planes, side view")]


def test_an_unnamed_model_is_called_by_its_parts(client):
    model = client.get(f"/oneshot/{train_model(client)}").json()
    assert model["name"] == "body, wing" and model["description"] is None


def test_concepts_trained_or_imported_keep_their_names(client):
    trained = client.post(
        "/concepts/train",
        files=photos(),
        data={"identifier": "my-mug", "class_word": "mug", "name": "Grandma's mug", "description": "blue, chipped"},
    ).json()["concept_id"]
    imported = client.post(
        "/concepts/import",
        files=[("embeddings", (EMBEDDINGS_FILE, safetensors_file({"<her-mug>": [1, 32]}), "application/octet-stream"))],
        data={"identifier": "her-mug", "class_word": "mug"},
    ).json()["concept_id"]
    listed = {c["id"]: (c["name"], c["description"]) for c in client.get("/concepts").json()["concepts"]}
    assert listed == {trained: ("Grandma's mug", "blue, chipped"), imported: ("her-mug", None)}
    assert client.get(f"/concepts/{trained}").json()["name"] == "Grandma's mug"


@pytest.mark.parametrize(
    "fields,message",
    [({"name": "x" * 65}, "name: at most 64 characters"), ({"description": "x" * 501}, "at most 500 characters")],
)
def test_overlong_names_are_refused(client, fields, message):
    response = post_train(client, [image_bytes()], [mask_png(two_part_mask())], labels="body", **fields)
    assert response.status_code == 422 and message in response.json()["error"]["message"]
