"""The OpenAPI document says exactly what the server does (issue 16 item 11): optional files are not
required, numbers and booleans are not each other, query integers are digits, and a static path
(`/concepts/import`) is never taken for an id."""

from __future__ import annotations

import base64

import pytest

from tests.support import image_bytes


def test_optional_files_are_not_required(client):
    paths = client.get("/openapi.json").json()["paths"]

    def required(path: str) -> tuple[set, set]:
        content = paths[path]["post"]["requestBody"]["content"]
        return set(content["multipart/form-data"]["schema"]["required"]), set(
            content["application/json"]["schema"]["required"]
        )

    form, json_body = required("/concepts/import")
    assert "embeddings" in form and "weights" not in form
    assert "embeddings_base64" in json_body and "weights_base64" not in json_body
    form, json_body = required("/concepts/train")
    assert "images" in form and "masks" not in form
    assert "images_base64" in json_body and "masks_base64" not in json_body
    form, json_body = required("/oneshot/train")  # SLiMe needs one mask per image
    assert {"images", "masks"} <= form and {"images_base64", "masks_base64"} <= json_body


@pytest.mark.parametrize("field, value", [("timestep", True), ("grid", False), ("grid", 16.0), ("kl_threshold", True)])
def test_json_numbers_are_numbers_and_integers_integers(client, field, value):
    body = {"image_base64": base64.b64encode(image_bytes()).decode(), field: value}
    response = client.post("/segment/unsupervised", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field


def test_form_booleans_are_not_integers(client):
    files = {"image": ("x.png", image_bytes(), "image/png")}
    assert client.post("/segment/unsupervised", files=files, data={"timestep": "true"}).status_code == 422
    assert client.post("/segment/unsupervised", files=files, data={"timestep": "7"}).status_code == 202


@pytest.mark.parametrize("value", ["+0.0", "0.0", "1e0", " 1", "0x1", "+1", "1_0"])
@pytest.mark.parametrize("path", ["/concepts", "/oneshot"])
def test_query_integers_are_digits(client, path, value):
    response = client.get(path, params={"offset": value})
    assert response.status_code == 422, (value, response.text)
    assert response.json()["error"]["field"] == "offset"
    assert client.get(path, params={"offset": "0", "limit": "7"}).status_code == 200


@pytest.mark.parametrize("path", ["/concepts/import", "/concepts/train", "/oneshot/train"])
@pytest.mark.parametrize("method", ["GET", "DELETE", "OPTIONS", "PUT"])
def test_static_paths_are_not_ids(client, path, method):
    response = client.request(method, path)
    assert response.status_code == 405, response.text
    assert response.headers["allow"] == "POST"
    assert "no concept" not in response.text and "no model" not in response.text
