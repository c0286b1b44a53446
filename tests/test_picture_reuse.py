"""A second question about the same picture (issue 15 item 7): results name their picture, and any
segmentation request may send that `image_id` instead of the file."""

from __future__ import annotations

import hashlib

import pytest

from attnseg.queue import get_queue, image_key
from tests.support import image_bytes

ALICE, BOB = {"Authorization": "Bearer k-alice"}, {"Authorization": "Bearer k-bob"}


def payload_of(connection, job_id: str) -> dict:
    return get_queue(connection, "attnseg:segment").fetch_job(job_id).args[0]


def test_a_result_names_its_picture_and_a_second_query_reuses_it(make_client, worker_on):
    connection, _, run = worker_on
    client = make_client()
    data = image_bytes(96, 64, seed=4)
    first = client.post(
        "/segment/text", files={"image": ("x.png", data, "image/png")}, data={"classes": "cat", "seed": "1"}
    )
    assert first.status_code == 202, first.text
    run(1)
    done = client.get(f"/jobs/{first.json()['id']}").json()
    assert done["status"] == "succeeded", done
    picture = done["result"]["image"]
    assert picture == {"id": hashlib.sha256(data).hexdigest(), "width": 96, "height": 64}

    again = client.post("/segment/text", json={"image_id": picture["id"], "classes": ["cat"], "seed": 1})
    assert again.status_code == 202, again.text
    assert payload_of(connection, again.json()["id"])["image"] == payload_of(connection, first.json()["id"])["image"]
    assert "image_id" not in again.json()["params"]
    run(1)
    second = client.get(f"/jobs/{again.json()['id']}").json()
    assert second["status"] == "succeeded", second
    assert second["result"]["segments"] == done["result"]["segments"]  # same picture, same seed: same masks


ROUTES = {
    "/segment/unsupervised": {},
    "/segment/text": {"classes": ["cat"]},
    "/segment/referring": {"class_word": "mug", "queries": ["a red mug"]},
    "/oneshot/m1/segment": {},  # the picture is checked before the model is looked up
}


@pytest.mark.parametrize("path", ROUTES)
def test_every_segmentation_route_wants_a_file_or_an_image_id_not_both(client, path):
    upload = {"image": ("x.png", image_bytes(32, 32), "image/png")}
    neither = client.post(path, json=ROUTES[path])
    both = client.post(path, data={**ROUTES[path], "image_id": "0" * 64}, files=upload)
    assert neither.status_code == 422 and neither.json()["error"]["field"] == "image", neither.text
    assert both.status_code == 422 and both.json()["error"]["field"] == "image_id", both.text


def test_an_unknown_expired_or_other_tenants_picture_is_not_found(make_client, redis_server):
    client = make_client(api_keys="alice:k-alice,bob:k-bob")
    data = image_bytes(40, 30, seed=2)
    posted = client.post("/segment/unsupervised", files={"image": ("x.png", data, "image/png")}, headers=ALICE)
    assert posted.status_code == 202, posted.text
    picture = hashlib.sha256(data).hexdigest()

    for image_id, headers in ((picture, BOB), ("f" * 64, ALICE), ("../x", ALICE), (picture.upper(), ALICE)):
        response = client.post("/segment/unsupervised", json={"image_id": image_id}, headers=headers)
        assert response.status_code == 404, response.text
        assert response.json()["error"] == {
            "code": "not_found",
            "message": response.json()["error"]["message"],
            "field": "image_id",
        }
    assert client.post("/segment/unsupervised", json={"image_id": 5}, headers=ALICE).status_code == 422
    assert redis_server.client().keys(image_key("bob", "*")) == []  # bob's try stored nothing

    connection = redis_server.client()
    key = image_key("alice", picture)
    connection.expire(key, 5)
    reused = client.post("/segment/unsupervised", json={"image_id": picture}, headers=ALICE)
    assert reused.status_code == 202, reused.text
    assert connection.ttl(key) > 5  # the reuse extends the picture's life as an upload would
    connection.delete(key)
    expired = client.post("/segment/unsupervised", json={"image_id": picture}, headers=ALICE)
    assert expired.status_code == 404, expired.text


def test_a_second_query_on_a_picture_reuses_its_latents_and_the_masks_stay_the_same(make_client, worker_on):
    from workers.engine import runtime

    _, settings, run = worker_on
    client = make_client()
    data = image_bytes(80, 60, seed=7)

    def ask_twice(cache_mib: int) -> tuple[list[dict], runtime.LatentCache]:
        sd = runtime.current().sd
        runtime.install(runtime.Runtime(settings.model_copy(update={"latent_cache_mib": cache_mib}), sd, None))
        first = client.post(
            "/segment/text", files={"image": ("x.png", data, "image/png")}, data={"classes": "cat", "seed": "2"}
        )
        picture = hashlib.sha256(data).hexdigest()
        second = client.post("/segment/text", json={"image_id": picture, "classes": ["dog", "cat"], "seed": 3})
        run(1)
        results = [client.get(f"/jobs/{r.json()['id']}").json()["result"] for r in (first, second)]
        return results, runtime.current().latents

    cached, cache = ask_twice(256)
    assert (cache.hits, cache.misses) == (1, 1)
    assert "fetch" in cached[0]["timings_ms"] and "fetch" not in cached[1]["timings_ms"]  # no decode either
    assert cached[1]["timings_ms"]["latent"] == 0.0
    uncached, no_cache = ask_twice(0)
    assert (no_cache.hits, no_cache.held_bytes) == (0, 0)
    assert [r["segments"] for r in cached] == [r["segments"] for r in uncached]


def test_the_latent_cache_drops_the_least_recently_used_beyond_its_bound():
    import torch

    from workers.engine.latent_cache import LatentCache

    entry = torch.zeros(1, 4, 8, 8)  # 1 KiB
    cache = LatentCache(max_bytes=2 * 1024)
    cache.put(("m", "a", 64, "f32"), entry)
    cache.put(("m", "b", 64, "f32"), entry)
    assert cache.get(("m", "a", 64, "f32")) is entry  # a is now the most recent
    cache.put(("m", "c", 64, "f32"), entry)
    assert cache.get(("m", "b", 64, "f32")) is None and cache.get(("m", "a", 64, "f32")) is entry
    assert cache.held_bytes == 2 * 1024
    cache.put(("m", "huge", 64, "f32"), torch.zeros(1, 4, 32, 32))  # over the whole bound: not kept
    assert cache.held_bytes == 2 * 1024 and cache.get(("m", "huge", 64, "f32")) is None
