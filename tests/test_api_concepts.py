"""Concept and referring submissions at the HTTP layer (real Redis, no worker): validation, the
upload checks against a worker's announced shapes, owners, and queueing. No torch here."""

from __future__ import annotations

import io
import json
import zipfile

import pytest

from attnseg import concept_store
from attnseg.concept_files import EMBEDDINGS_FILE, KV_FILE
from attnseg.queue import get_queue
from attnseg.workers_registry import announce
from service.deps import current_tenant
from tests.support import deflate_bomb, image_bytes, raw_safetensors, safetensors_file
from tests.test_api import queued_jobs

LAYER = "mid_block.attentions.0.transformer_blocks.0.attn2"
SHAPES = {"text_width": 32, "cross_attention": {LAYER: [64, 32]}}


def photos(count=3):
    return [("images", (f"p{i}.png", image_bytes(64, 48, seed=i), "image/png")) for i in range(count)]


def train(client, count=3, **fields):
    return client.post(
        "/concepts/train", files=photos(count), data={"identifier": "my-mug", "class_word": "mug", **fields}
    )


def import_files(client, embeddings: bytes, weights: bytes | None = None, identifier="my-mug"):
    files = [("embeddings", (EMBEDDINGS_FILE, embeddings, "application/octet-stream"))]
    if weights is not None:
        files.append(("weights", (KV_FILE, weights, "application/octet-stream")))
    return client.post("/concepts/import", files=files, data={"identifier": identifier, "class_word": "mug"})


def announce_worker(redis_server, shapes=SHAPES):
    announce(redis_server.client(), {"name": "w1", "sd_model": "tiny-random", "concept_shapes": shapes}, ttl_s=60)


def test_train_queues_a_concept_training_job(client, redis_server):
    response = train(client, train_kv="false", steps="5")
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["kind"] == "concept_train" and job["concept_id"] and job["status"] == "queued"
    assert job["params"]["identifier"] == "my-mug" and job["params"]["train_kv"] is False
    assert get_queue(redis_server.client(), "attnseg:train").count == 1
    concept = client.get(f"/concepts/{job['concept_id']}").json()
    assert concept["status"] == "training" and concept["method"] == "textual_inversion"
    assert concept["progress"] == {"stage": "queued", "fraction": 0.0} and concept["files"] == []
    listing = client.get("/concepts").json()
    assert listing["total"] == 1 and listing["concepts"][0]["id"] == job["concept_id"]
    again = train(client)
    assert again.status_code == 409 and "already the identifier" in again.json()["error"]["message"]


@pytest.mark.parametrize(
    "count, fields, message",
    [
        (2, {}, "3 to 20 photos"),
        (21, {}, "3 to 20 photos"),
        (3, {"identifier": "my mug"}, "identifier"),
        (3, {"identifier": "<my-mug>"}, "identifier"),
        (3, {"class_word": "mug."}, "class_word"),
        (3, {"steps": "0"}, "steps"),
    ],
)
def test_bad_training_requests_are_refused(client, redis_server, count, fields, message):
    response = train(client, count, **fields)
    assert response.status_code == 422, response.text
    assert message in response.json()["error"]["message"] + response.json()["error"].get("field", "")
    assert queued_jobs(redis_server) == 0


def test_masks_must_match_the_photos(client):
    files = photos() + [("masks", ("m.png", image_bytes(10, 10), "image/png"))]
    response = client.post("/concepts/train", files=files, data={"identifier": "a", "class_word": "mug"})
    assert response.status_code == 422 and "one mask per image" in response.json()["error"]["message"]


def test_import_checks_safetensors_against_the_workers_model(client, redis_server):
    announce_worker(redis_server)
    wide = import_files(client, safetensors_file({"<my-mug>": [1, 48]}))
    assert wide.status_code == 422, wide.text
    error = wide.json()["error"]
    assert "48 wide but the text encoder of tiny-random is 32 wide" in error["message"]
    assert error["field"] == "embeddings" and queued_jobs(redis_server) == 0
    bad_layer = import_files(
        client,
        safetensors_file({"<my-mug>": [1, 32]}),
        safetensors_file(
            {
                f"{LAYER}.processor.to_k_custom_diffusion.weight": [64, 48],
                f"{LAYER}.processor.to_v_custom_diffusion.weight": [64, 48],
            }
        ),
    )
    assert bad_layer.status_code == 422 and "needs [64, 32]" in bad_layer.json()["error"]["message"]
    assert bad_layer.json()["error"]["field"] == "weights"
    not_cd = import_files(client, safetensors_file({"<my-mug>": [1, 32]}), safetensors_file({"x": [2]}))
    assert not_cd.status_code == 422 and "not a Custom Diffusion weights file" in not_cd.json()["error"]["message"]
    good = import_files(
        client,
        safetensors_file({"<my-mug>": [2, 32]}),
        safetensors_file(
            {
                f"{LAYER}.processor.to_k_custom_diffusion.weight": [64, 32],
                f"{LAYER}.processor.to_v_custom_diffusion.weight": [64, 32],
            }
        ),
    )
    assert good.status_code == 202, good.text
    job = good.json()
    assert job["kind"] == "concept_import"
    concept = client.get(f"/concepts/{job['concept_id']}").json()
    assert concept["status"] == "importing" and concept["method"] == "custom_diffusion"
    assert concept["files"] == []  # the uploads are not the concept's files until the worker has read them
    export = client.get(f"/concepts/{job['concept_id']}/files/{EMBEDDINGS_FILE}")
    assert export.status_code == 404


def torch_zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_import_of_a_torch_zip_is_left_to_the_worker(client, redis_server):
    announce_worker(redis_server)
    response = import_files(client, torch_zip({"archive/data.pkl": b"\x80\x02}q\x00.", "archive/data/0": bytes(16)}))
    assert response.status_code == 202, response.text


def header(entries: dict) -> bytes:
    return raw_safetensors(json.dumps(entries).encode())


def entry(shape, dtype="F32", offsets=(0, 0)):
    return {"dtype": dtype, "shape": shape, "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    "embeddings, message",
    [
        (header({"<my-mug>": entry(5)}), "shape must be a list"),
        (header({"<my-mug>": entry(["a", 32])}), "shape must be a list"),
        (header({"<my-mug>": entry(None)}), "shape must be a list"),
        (header({"<my-mug>": entry([True, 32])}), "shape must be a list"),
        (header({"<my-mug>": entry([-1, 32])}), "shape must be a list"),
        (raw_safetensors(b"[" * 100_000), "nested too deep"),
        (raw_safetensors(b"[1, 2]"), "must be a JSON object"),
        (raw_safetensors(b"{not json"), "not valid JSON"),
        (b"\xff" * 8 + b"{}", "header length"),
        (b"abc", "too short"),
        (header({"<my-mug>": "x"}), "exactly dtype, shape and data_offsets"),
        (header({"<my-mug>": entry([1, 32], offsets=(0, 128))}), "the data after the header is 0"),
        (header({"<my-mug>": entry([1, 32], offsets=(0, 64))}), "needs 128"),
        (header({"<my-mug>": entry([1, 32], offsets=("0", 128))}), "data_offsets must be two"),
        (header({"__metadata__": {"a": 1}, "<my-mug>": entry([0, 32])}), "__metadata__"),
        (header({}), "holds no tensors"),
        (safetensors_file({"<my-mug>": [1, 32]}, "BOOL"), "floating point"),
        (safetensors_file({"<my-mug>": [1, 32]}, "I64"), "floating point"),
        (safetensors_file({"<my-mug>": [1, 32]}, "U8"), "floating point"),
        (safetensors_file({"<my-mug>": [1, 32]}, "C64"), "floating point"),
        (safetensors_file({"a": [1, 32], "b": [1, 32]})[:-4], "the data after the header is 252"),
        (b"\x80\x02\x8a\x0alegacy torch pickle", "legacy torch files"),
        (b"PK\x03\x04 not really a zip", "not a readable zip"),
        (torch_zip({"archive/version": b"3"}), "one data.pkl"),
        (deflate_bomb(), "at most 167772160"),
    ],
)
def test_malformed_or_oversized_files_are_refused_from_their_headers(client, redis_server, embeddings, message):
    response = import_files(client, embeddings)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_concept" and error["field"] == "embeddings", error
    assert message in error["message"], error
    assert queued_jobs(redis_server) == 0
    weights = import_files(client, safetensors_file({"<my-mug>": [1, 32]}), embeddings)
    assert weights.status_code == 422 and weights.json()["error"]["field"] == "weights", weights.text


def test_referring_and_text_resolve_identifiers(client, redis_server):
    image = {"image": ("x.png", image_bytes(), "image/png")}
    unknown = client.post("/segment/referring", files=image, data={"class_word": "mug", "queries": '["<my-mug> mug"]'})
    assert unknown.status_code == 422 and "<my-mug> is not a concept of yours" in unknown.json()["error"]["message"]
    concept_id = train(client).json()["concept_id"]
    response = client.post(
        "/segment/referring",
        files=image,
        data={"class_word": "mug", "queries": '["<my-mug> mug", "a red mug"]', "seed": "1"},
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["kind"] == "referring" and job["status"] == "queued"
    assert job["progress"]["stage"] == "waiting for the model's training"  # it waits for the concept
    assert job["params"]["queries"] == ["<my-mug> mug", "a red mug"] and job["params"]["max_instances"] == 8
    text = client.post("/segment/text", files=image, data={"classes": '["<my-mug> mug", "table"]'})
    assert text.status_code == 202, text.text
    gem = client.post("/segment/text", files=image, data={"classes": '["<my-mug> mug"]', "method": "gem"})
    assert gem.status_code == 422 and "'selfcross' only" in gem.json()["error"]["message"]
    other = client.post("/concepts/train", files=photos(), data={"identifier": "her-mug", "class_word": "mug"})
    assert other.status_code == 202
    both = client.post("/segment/text", files=image, data={"classes": '["<my-mug> mug", "<her-mug> mug"]'})
    assert both.status_code == 422 and "only one of them" in both.json()["error"]["message"]
    two = client.post("/segment/referring", files=image, data={"class_word": "mug", "queries": '["<a> <b>"]'})
    assert two.status_code == 422 and "more than one concept" in two.json()["error"]["message"]
    assert client.delete(f"/concepts/{concept_id}").status_code == 204
    assert client.get(f"/concepts/{concept_id}").status_code == 404
    assert train(client).status_code == 202  # the identifier is free again


def test_failed_concept_is_refused_by_queries(client, redis_server):
    concept_id = train(client).json()["concept_id"]
    concept_store.store.update(
        redis_server.client(), concept_id, status="failed", error={"code": "internal_error", "message": "boom"}
    )
    response = client.post(
        "/segment/referring",
        files={"image": ("x.png", image_bytes(), "image/png")},
        data={"class_word": "mug", "queries": '["<my-mug> mug"]'},
    )
    assert response.status_code == 409 and "boom" in response.json()["error"]["message"]


def test_each_tenant_sees_only_its_concepts(client):
    tenant = {"value": "acme"}
    client.app.dependency_overrides[current_tenant] = lambda: tenant["value"]
    try:
        concept_id = train(client).json()["concept_id"]
        tenant["value"] = "globex"
        assert client.get("/concepts").json() == {"concepts": [], "total": 0}
        assert client.get(f"/concepts/{concept_id}").status_code == 404
        assert client.delete(f"/concepts/{concept_id}").status_code == 404
        assert train(client).status_code == 202  # identifiers are per tenant
        tenant["value"] = "acme"
        assert [c["id"] for c in client.get("/concepts").json()["concepts"]] == [concept_id]
    finally:
        client.app.dependency_overrides.clear()
