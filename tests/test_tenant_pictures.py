"""Pictures are stored per tenant (issue 16 item 7): another tenant's upload of the same bytes neither
extends, shortens nor reveals one's picture."""

from __future__ import annotations

from attnseg.queue import get_queue
from tests.support import image_bytes


def picture_key(redis_server, job_id: str) -> str:
    job = get_queue(redis_server.client(), "attnseg:segment").fetch_job(job_id)
    return job.args[0]["image"]["key"]  # the payload


def test_the_same_bytes_from_two_tenants_are_two_pictures(make_client, redis_server):
    client = make_client(api_keys="alice:k-alice,bob:k-bob")
    data = image_bytes(seed=3)

    def post(key: str) -> str:
        response = client.post(
            "/segment/unsupervised",
            files={"image": ("x.png", data, "image/png")},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert response.status_code == 202, response.text
        return picture_key(redis_server, response.json()["id"])

    connection = redis_server.client()
    alices = post("k-alice")
    connection.expire(alices, 86_400)  # as when her job succeeds
    bobs = post("k-bob")
    assert alices != bobs and "alice" in alices and "bob" in bobs
    assert connection.ttl(alices) > 80_000  # bob's upload did not touch her picture
    assert post("k-alice") == alices and connection.ttl(alices) > 80_000  # her own upload never shortens it
