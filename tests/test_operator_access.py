"""Operations details are for operators (issue 16 item 8): `/metrics` and `/readyz` details need an
`ATTNSEG_ADMIN_KEYS` key once any key is configured; tenants' keys get 403 and the bare verdict."""

from __future__ import annotations

import pytest

from tests.support import image_bytes
from tests.test_api import post_image


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_tenants_keys_do_not_open_operations_details(make_client):
    client = make_client(api_keys="alice:k-alice,bob:k-bob", admin_keys="op-1, op-2")
    assert client.get("/metrics").status_code == 401
    refused = client.get("/metrics", headers=bearer("k-alice"))
    assert refused.status_code == 403 and "ATTNSEG_ADMIN_KEYS" in refused.json()["error"]["message"]
    assert client.get("/metrics", headers=bearer("wrong")).status_code == 401
    for key in ("op-1", "op-2"):
        assert client.get("/metrics", headers=bearer(key)).status_code == 200
    for headers in ({}, bearer("k-bob"), bearer("wrong")):
        bare = client.get("/readyz", headers=headers)
        assert bare.status_code == 503 and set(bare.json()) == {"ready", "redis", "key"}, headers
    detailed = client.get("/readyz", headers=bearer("op-1")).json()
    assert "workers" in detailed and "queues" in detailed


def test_admin_keys_are_not_tenants_keys(make_client):
    client = make_client(api_keys="alice:k-alice", admin_keys="op-1")
    assert client.get("/concepts", headers=bearer("op-1")).status_code == 401
    assert (
        client.post(
            "/segment/unsupervised", files={"image": ("x.png", image_bytes(), "image/png")}, headers=bearer("op-1")
        ).status_code
        == 401
    )


@pytest.mark.parametrize("keys", [{"api_key": "k"}, {"admin_keys": "op"}])
def test_any_key_closes_operations_to_all_but_operators(make_client, keys):
    client = make_client(**keys)
    assert client.get("/metrics", headers=bearer("k")).status_code in (401, 403)
    assert set(client.get("/readyz", headers=bearer("k")).json()) == {"ready", "redis", "key"}


def test_without_keys_operations_stay_open(client):
    assert post_image(client, image_bytes()).status_code == 202
    assert client.get("/metrics").status_code == 200
    assert "queues" in client.get("/readyz").json()
