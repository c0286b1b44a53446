"""Production hardening at the HTTP layer (real Redis, no worker): a clean answer to every request,
admission before storage, tenants, edges."""

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from attnseg.images import UnsupportedModeError, load_image, to_rgb
from attnseg.queue import ONESHOT_INDEX_KEY, ONESHOT_PREFIX, QUEUES, clean_canceled, get_queue
from attnseg.settings import Settings
from service.app import create_app
from tests.support import image_bytes
from tests.test_api import post_image, queued_jobs


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def redis_state(redis_server) -> dict:
    """Every key with its value: what a refused request must leave untouched."""
    connection = redis_server.client()
    read = {
        b"string": connection.get,
        b"hash": connection.hgetall,
        b"set": connection.smembers,
        b"list": lambda key: connection.lrange(key, 0, -1),
        b"zset": lambda key: connection.zrange(key, 0, -1, withscores=True),
    }
    return {key: read[connection.type(key)](key) for key in connection.keys("*")}


# --- every request gets a clean answer ---------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/jobs/a.b",
        "/jobs/a%20b",
        "/jobs/a%20b/overlay.png",
        "/jobs/" + "x" * 5000,
        "/jobs/..%2F..",
        "/oneshot/a.b",
        "/oneshot/" + "y" * 5000,
    ],
)
def test_ids_of_any_shape_are_404(client, path):
    for method in ("GET", "DELETE"):
        if method == "DELETE" and path.endswith(".png"):
            continue
        response = client.request(method, path)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["code"] == "not_found"
        assert len(response.json()["error"]["message"]) < 200  # the id is echoed shortened


def test_paging_values_of_any_size_are_422(client):
    for offset in ("9223372036854775807", "-1", "1" * 400):
        response = client.get("/oneshot", params={"offset": offset})
        assert response.status_code == 422, response.text
        assert response.json()["error"]["field"] == "offset"
    assert client.get("/oneshot", params={"offset": 1_000_000}).status_code == 200


def test_json_depth_and_number_size_are_named_limits(client):
    deep = b'{"image_base64": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = client.post("/segment/unsupervised", content=deep, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "32 levels" in response.json()["error"]["message"]
    medium = b'{"seed": ' + b"[" * 100 + b"]" * 100 + b"}"
    response = client.post("/segment/unsupervised", content=medium, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "32 levels" in response.json()["error"]["message"]
    huge = b'{"seed": ' + b"9" * 5000 + b"}"
    response = client.post("/segment/unsupervised", content=huge, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "limit of 20" in response.json()["error"]["message"]
    for constant in (b"NaN", b"Infinity", b"1e999"):
        response = client.post(
            "/segment/unsupervised",
            content=b'{"kl_threshold": ' + constant + b"}",
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 400, response.text
    as_form = post_image(client, image_bytes(), seed="9" * 5000)
    assert as_form.status_code == 422 and as_form.json()["error"]["field"] == "seed"


def gradient16() -> Image.Image:
    return Image.fromarray(np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (32, 1)))


def stored_pixels(redis_server, job: dict) -> np.ndarray:
    payload = get_queue(redis_server.client(), QUEUES[0]).fetch_job(job["id"]).args[0]
    return load_image(redis_server.client(), payload["image"]["key"])


def test_a_16_bit_gradient_stays_a_gradient(client, redis_server):
    response = post_image(client, encoded(gradient16()))
    assert response.status_code == 202, response.text
    pixels = stored_pixels(redis_server, response.json())
    row = pixels[0, :, 0].astype(int)
    assert pixels.dtype == np.uint8 and row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0) and len(np.unique(row)) > 200  # monotone, not clipped to 255


def palette_with_transparency() -> Image.Image:
    image = Image.fromarray(np.arange(128, dtype=np.uint8).reshape(8, 16), mode="L").convert("P")
    image.info["transparency"] = 0
    return image


MODES = {
    "LA": lambda: encoded(Image.new("LA", (16, 8), (200, 100))),
    "P with transparency": lambda: encoded(palette_with_transparency()),
    "CMYK JPEG": lambda: encoded(Image.new("CMYK", (16, 8), (0, 255, 255, 0)), "JPEG"),
    "1-bit": lambda: encoded(Image.new("1", (16, 8), 1)),
    "RGBA WebP": lambda: encoded(Image.new("RGBA", (16, 8), (10, 20, 30, 40)), "WEBP", lossless=True),
}


@pytest.mark.parametrize("name", list(MODES))
def test_pictures_in_other_modes_become_8_bit_rgb(client, redis_server, name):
    response = post_image(client, MODES[name]())
    assert response.status_code == 202, response.text
    pixels = stored_pixels(redis_server, response.json())
    assert pixels.shape == (8, 16, 3) and pixels.dtype == np.uint8


def test_colours_survive_the_conversions():
    cmyk = to_rgb(Image.open(io.BytesIO(encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"))))
    assert np.allclose(np.asarray(cmyk)[4, 4], (255, 0, 0), atol=8)  # cyan-free, magenta+yellow: red
    assert np.asarray(to_rgb(Image.new("LA", (2, 2), (200, 0))))[0, 0].tolist() == [200, 200, 200]
    palette = to_rgb(Image.open(io.BytesIO(encoded(palette_with_transparency()))))
    assert np.asarray(palette)[0, 1].tolist() == [1, 1, 1]
    assert np.asarray(to_rgb(palette_with_transparency().convert("PA")))[0, 1].tolist() == [1, 1, 1]


def test_a_mode_without_rgb_form_is_refused_naming_it():
    with pytest.raises(UnsupportedModeError, match="'F'"):
        to_rgb(Image.new("F", (2, 2)))


def test_decoder_errors_never_show_python_objects(client):
    broken = b"\x89PNG\r\n\x1a\n" + b"\0" * 64
    response = post_image(client, broken)
    assert response.status_code == 400
    assert "_io" not in response.json()["error"]["message"] and "0x" not in response.json()["error"]["message"]


def test_form_and_json_take_the_same_fields_and_types(client):
    train = client.post(
        "/oneshot/train",
        files=[("images", ("i.png", image_bytes(), "image/png")), ("masks", ("m.png", mask_bytes(), "image/png"))],
        data={"labels": "part", "crops_per_side": "2", "epochs": "3", "min_crop": "0.8"},
    )
    assert train.status_code == 202, train.text
    assert train.json()["params"]["crops_per_side"] == 2 and train.json()["params"]["min_crop"] == 0.8
    model_id = train.json()["model_id"]
    form = client.post(
        f"/oneshot/{model_id}/segment",
        files={"image": ("x.png", image_bytes(), "image/png")},
        data={"crops_per_side": "2"},
    )
    assert form.status_code == 202, form.text
    as_json = client.post(
        f"/oneshot/{model_id}/segment",
        json={"image_base64": base64.b64encode(image_bytes()).decode(), "crops_per_side": 2},
    )
    assert as_json.status_code == 202 and as_json.json()["params"] == {
        **form.json()["params"],
        "seed": as_json.json()["params"]["seed"],
    }
    assert post_image(client, image_bytes(), refine="true").json()["params"]["refine"] is True


def test_a_broken_json_list_in_a_form_is_422_not_a_class(client, redis_server):
    response = client.post(
        "/segment/text", files={"image": ("x.png", image_bytes(), "image/png")}, data={"classes": "[sky"}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "classes"
    assert queued_jobs(redis_server) == 0


def test_text_that_cannot_fit_the_prompt_is_refused_at_submission(client, redis_server):
    words = json.dumps([f"w-{i}-x-y" for i in range(20)])  # >= 7 tokens each: far over 77 in one prompt
    response = post_image(client, image_bytes(), vocabulary=words)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "vocabulary" and "77" in error["message"]
    one_class = json.dumps(["-".join("abcdefghijklmnopqrstuvwxyz"[:30] * 2)[:64]])
    response = client.post(
        "/segment/text",
        files={"image": ("x.png", image_bytes(), "image/png")},
        data={"classes": one_class, "background_words": '["a-b-c-d-e-f-g-h"]'},
    )
    assert response.status_code == 422 and "77" in response.json()["error"]["message"]
    assert queued_jobs(redis_server) == 0
    fits = json.dumps([f"word{i}" for i in range(10)])
    assert post_image(client, image_bytes(), vocabulary=fits).status_code == 202


def test_405_names_every_allowed_method(client):
    response = client.put("/jobs/abc")
    assert response.status_code == 405
    assert set(response.headers["allow"].split(", ")) == {"GET", "DELETE"}
    assert "GET" in response.json()["error"]["message"]


def test_openapi_declares_security_required_fields_and_statuses(client):
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key: `Authorization: Bearer <key>`.",
    }
    body = spec["paths"]["/segment/text"]["post"]["requestBody"]["content"]
    multipart, as_json = body["multipart/form-data"]["schema"], body["application/json"]["schema"]
    assert "classes" in multipart["required"] and "classes" in as_json["required"]
    # the picture: exactly one of the file and the id of one stored earlier
    assert multipart["oneOf"] == [{"required": ["image"]}, {"required": ["image_id"]}]
    assert as_json["oneOf"] == [{"required": ["image_base64"]}, {"required": ["image_id"]}]
    train = spec["paths"]["/oneshot/train"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"images", "masks", "labels"} <= set(train["required"])
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if path.startswith(("/jobs", "/oneshot", "/segment")) or path == "/metrics":
                assert "401" in operation["responses"], (method, path)
                assert operation["security"] == [{"HTTPBearer": []}]
    assert spec["paths"]["/readyz"]["get"]["security"] == [{"HTTPBearer": []}, {}]  # a key or none
    assert "HTTPValidationError" not in json.dumps(spec)  # every 422 is the error envelope we send


# --- admission before storage ----------------------------------------------------------------


def test_a_full_queue_refuses_before_storing_anything(make_client, redis_server):
    client = make_client(max_queued_jobs=1)
    assert post_image(client, image_bytes(seed=1)).status_code == 202
    before = redis_state(redis_server)
    response = post_image(client, image_bytes(seed=2))  # another picture: it would get a key of its own
    assert response.status_code == 429 and response.headers["retry-after"] == "30"
    assert redis_state(redis_server) == before


def test_the_queue_cap_counts_only_live_jobs(make_client, redis_server):
    client = make_client(max_queued_jobs=1)
    job = post_image(client, image_bytes()).json()
    redis_server.client().delete(f"rq:job:{job['id']}")  # it expired while queued; its id stays in the list
    assert post_image(client, image_bytes()).status_code == 202


def test_the_queue_cap_holds_under_concurrency(redis_server):
    """Eight API replicas (apps) submitting at once never overshoot the cap."""
    redis_server.client().flushall()
    settings = Settings(redis_url=redis_server.url, max_queued_jobs=5)
    statuses: list[int] = []

    def replica(seed: int):
        with TestClient(create_app(settings)) as client:
            for attempt in range(3):
                statuses.append(post_image(client, image_bytes(40, 30, seed=seed * 10 + attempt)).status_code)

    threads = [threading.Thread(target=replica, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(set(statuses)) == [202, 429] and statuses.count(202) == 5
    assert queued_jobs(redis_server) == 5
    assert len(redis_server.client().keys("attnseg:image:*")) == 5  # refused pictures never stored


def test_storage_holds_no_lock_and_a_reserved_slot_counts(make_client, redis_server, monkeypatch):
    """While one upload is being stored, another is admitted; its reserved slot counts at the cap."""
    import service.submit

    client = make_client(max_queued_jobs=2)
    storing, release = threading.Event(), threading.Event()
    store = service.submit.store_bytes

    def slow_store(connection, owner, data, ttl):
        if not storing.is_set():
            storing.set()
            assert release.wait(10)
        return store(connection, owner, data, ttl)

    monkeypatch.setattr(service.submit, "store_bytes", slow_store)
    first: list = []
    thread = threading.Thread(target=lambda: first.append(post_image(client, image_bytes(seed=1))))
    thread.start()
    assert storing.wait(10)
    assert post_image(client, image_bytes(seed=2)).status_code == 202  # not held behind the first store
    before = redis_state(redis_server)
    assert post_image(client, image_bytes(seed=3)).status_code == 429  # the first's slot is reserved
    assert redis_state(redis_server) == before
    release.set()
    thread.join()
    assert first[0].status_code == 202 and queued_jobs(redis_server) == 2
    assert not redis_server.client().keys("attnseg:reserved*")  # reservations end with the enqueue


def test_a_failed_store_gives_its_slot_back(make_client, redis_server, monkeypatch):
    import service.submit

    client = make_client(max_queued_jobs=1)

    def failing_store(connection, owner, data, ttl):
        raise ConnectionError("redis went away mid-upload")

    monkeypatch.setattr(service.submit, "store_bytes", failing_store)
    with pytest.raises(ConnectionError):  # the test client re-raises what the app did not handle
        post_image(client, image_bytes())
    monkeypatch.undo()
    assert not redis_server.client().keys("attnseg:reserved*")
    assert post_image(client, image_bytes()).status_code == 202


# --- tenants ---------------------------------------------------------------------------------


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_tenants_see_only_their_own_jobs_and_models(make_client):
    client = make_client(api_keys="alice:k-alice, bob:k-bob", api_key="k-default")
    job = client.post(
        "/segment/unsupervised", files={"image": ("x.png", image_bytes(), "image/png")}, headers=bearer("k-alice")
    ).json()
    for method, path in (
        ("GET", f"/jobs/{job['id']}"),
        ("GET", f"/jobs/{job['id']}/overlay.png"),
        ("DELETE", f"/jobs/{job['id']}"),
    ):
        assert client.request(method, path, headers=bearer("k-bob")).status_code == 404
        assert client.request(method, path, headers=bearer("k-default")).status_code == 404
    assert client.get(f"/jobs/{job['id']}", headers=bearer("k-alice")).status_code == 200

    train = client.post(
        "/oneshot/train",
        files=[("images", ("i.png", image_bytes(), "image/png")), ("masks", ("m.png", mask_bytes(), "image/png"))],
        data={"labels": "part"},
        headers=bearer("k-bob"),
    ).json()
    model = train["model_id"]
    assert client.get("/oneshot", headers=bearer("k-bob")).json()["total"] == 1
    assert client.get("/oneshot", headers=bearer("k-alice")).json() == {"models": [], "total": 0}
    assert client.get(f"/oneshot/{model}", headers=bearer("k-alice")).status_code == 404
    assert client.delete(f"/oneshot/{model}", headers=bearer("k-alice")).status_code == 404
    assert (
        client.post(
            f"/oneshot/{model}/segment",
            files={"image": ("x.png", image_bytes(), "image/png")},
            headers=bearer("k-alice"),
        ).status_code
        == 404
    )
    assert client.get(f"/jobs/{train['id']}", headers=bearer("k-alice")).status_code == 404
    assert client.get(f"/oneshot/{model}", headers=bearer("k-bob")).status_code == 200
    assert client.get("/oneshot", headers=bearer("k-wrong")).status_code == 401


def test_keys_file_is_reread_when_it_changes(make_client, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# tenants\nalice:first\n")
    client = make_client(api_keys_file=keys)
    assert client.get("/oneshot", headers=bearer("first")).status_code == 200
    keys.write_text("alice:second\ncarol:third\n")
    import os

    os.utime(keys, ns=(1, 10**18))  # a different mtime even on coarse clocks
    assert client.get("/oneshot", headers=bearer("first")).status_code == 401
    assert client.get("/oneshot", headers=bearer("third")).status_code == 200


def test_per_tenant_queue_cap_leaves_other_tenants_free(make_client, redis_server):
    client = make_client(api_keys="alice:a,bob:b", max_queued_per_tenant=2)

    def submit(key):
        return client.post(
            "/segment/unsupervised", files={"image": ("x.png", image_bytes(), "image/png")}, headers=bearer(key)
        )

    assert [submit("a").status_code for _ in range(2)] == [202, 202]
    before = redis_state(redis_server)
    refused = submit("a")
    assert refused.status_code == 429 and refused.headers["retry-after"]
    assert refused.json()["error"]["code"] == "tenant_queue_full" and "2" in refused.json()["error"]["message"]
    assert redis_state(redis_server) == before
    assert submit("b").status_code == 202
    job = get_queue(redis_server.client(), QUEUES[0]).get_job_ids()[0]
    assert client.delete(f"/jobs/{job}", headers=bearer("a")).json()["status"] == "canceled"
    assert submit("a").status_code == 202  # a canceled job no longer counts


def test_unauthenticated_refusal_writes_nothing(make_client, redis_server):
    client = make_client(api_key="k")
    before = redis_state(redis_server)
    assert post_image(client, image_bytes()).status_code == 401
    assert redis_state(redis_server) == before


# --- edges -----------------------------------------------------------------------------------


def test_security_headers_on_every_answer(make_client):
    client = make_client(api_key="k")
    answers = [
        client.get("/healthz"),
        client.get("/jobs/x"),
        client.get("/jobs/x", headers=bearer("k")),
        client.post(
            "/segment/unsupervised",
            content=b"\xff\xd8\xff" + b"0" * 2_100_000,
            headers={"content-type": "application/json", **bearer("k")},
        ),
        client.put("/jobs/x"),
    ]
    assert [a.status_code for a in answers] == [200, 401, 404, 413, 405]
    for answer in answers:
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["x-frame-options"] == "DENY"


def test_cors_allows_exactly_the_configured_origins(make_client):
    client = make_client(cors_origins="https://ui.example.com")
    preflight = {
        "Origin": "https://ui.example.com",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    allowed = client.options("/segment/unsupervised", headers=preflight)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://ui.example.com"
    other = client.get("/healthz", headers={"Origin": "https://evil.example.com"})
    assert "access-control-allow-origin" not in other.headers
    assert "access-control-allow-origin" not in make_client().get("/healthz", headers=preflight).headers


# --- operations --------------------------------------------------------------------------------


def test_canceled_entries_of_gone_jobs_are_cleaned(client, redis_server):
    job = post_image(client, image_bytes()).json()
    client.delete(f"/jobs/{job['id']}")
    connection = redis_server.client()
    registry = f"rq:canceled:{QUEUES[0]}"
    assert connection.zcard(registry) == 1
    assert clean_canceled(connection, QUEUES[0]) == 0  # the job still exists: kept
    connection.delete(f"rq:job:{job['id']}")
    assert clean_canceled(connection, QUEUES[0]) == 1 and connection.zcard(registry) == 0


def mask_bytes() -> bytes:
    mask = np.zeros((200, 300), np.uint8)
    mask[50:150, 100:200] = 1
    return encoded(Image.fromarray(mask, mode="L"))


def test_sigterm_answers_open_long_polls_and_exits_promptly(tmp_path):
    """A `wait=60` long-poll used to hold the API's exit for 61 s; now it answers with the current state."""
    import httpx

    from tests.support import Stack, wait_until_ok

    stack = Stack(tmp_path)
    stack.redis.start()
    stack.start_api()
    try:
        wait_until_ok(f"{stack.base_url}/healthz", timeout=60, message="the API")
        job = httpx.post(
            f"{stack.base_url}/segment/unsupervised", files={"image": ("x.png", image_bytes(), "image/png")}
        ).json()
        answers: list = []
        poll = threading.Thread(
            target=lambda: answers.append(
                httpx.get(f"{stack.base_url}/jobs/{job['id']}", params={"wait": 60}, timeout=90)
            )
        )
        poll.start()
        time.sleep(3)  # let the long-poll reach the API (it holds for 60 s, so it is still open)
        assert poll.is_alive()
        stack.api.terminate()
        stack.api.wait(timeout=20)  # 61 s before; the bound here only tells a hang from an exit
        poll.join(timeout=20)
        assert answers and answers[0].status_code == 200 and answers[0].json()["status"] == "queued"
    finally:
        stack.stop()


def test_worker_names_are_unique_per_process_start():
    """A restarted worker (same host, same pid 1 under Docker) never meets its dead predecessor's name."""
    import os
    import socket

    from workers.engine.worker import default_worker_name

    first, second = default_worker_name(), default_worker_name()
    assert first != second
    assert first.startswith(f"{socket.gethostname()}.{os.getpid()}.")


def test_models_from_before_tenants_are_listed_for_tenant_default(make_client, redis_server):
    """One-shot models indexed in the single pre-tenant index are adopted by tenant `default` at start."""
    client = make_client()
    raw = redis_server.client()
    record = {
        "id": "m0",
        "status": "failed",
        "labels": ["wheel"],
        "params": {},
        "sd_model": None,
        "train_job_id": "gone",
        "created_at": "2026-11-30T00:00:00+00:00",
        "metrics": {},
        "error": None,
    }
    raw.set(f"{ONESHOT_PREFIX}:m0", json.dumps(record))
    raw.zadd(ONESHOT_INDEX_KEY, {"m0": 1.0})
    with client:  # start-up runs the adoption
        listed = client.get("/oneshot").json()
    assert [model["id"] for model in listed["models"]] == ["m0"] and listed["total"] == 1
    assert not raw.exists(ONESHOT_INDEX_KEY)
