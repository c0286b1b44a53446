"""Trained one-shot (SLiMe) models, stored durably in Redis (no TTL) so any worker can use them.

A model record is a JSON document (attnseg.record_store): id, owner (the tenant), name and
description (as given, or None), status
(training | ready | failed), labels, the SD model it belongs to, training parameters and metrics,
the training job id, and (when ready) the learned vectors. Each tenant lists only its own.
"""

from __future__ import annotations

from attnseg.ownership import DEFAULT_TENANT
from attnseg.queue import ONESHOT_INDEX_KEY, ONESHOT_PREFIX
from attnseg.record_store import RecordStore, new_id

store = RecordStore(ONESHOT_PREFIX, ONESHOT_INDEX_KEY)
new_model_id = new_id


def create(
    connection,
    model_id: str,
    *,
    tenant: str,
    labels: list[str],
    params: dict,
    train_job_id: str,
    name: str | None = None,
    description: str | None = None,
) -> dict:
    return store.create(
        connection,
        model_id,
        {
            "name": name,
            "description": description,
            "status": "training",
            "labels": labels,
            "params": params,
            "sd_model": None,
            "train_job_id": train_job_id,
            "metrics": {},
        },
        owner=tenant,
    )


def get(connection, model_id: str) -> dict | None:
    """The record whoever owns it (the API checks the owner; workers act for the job's owner)."""
    return store.get_any(connection, model_id)


def update(connection, model_id: str, **fields) -> dict | None:
    """Update fields of an existing record; None when it was deleted meanwhile (nothing is recreated)."""
    return store.update(connection, model_id, **fields)


def list_ids(connection, tenant: str, *, offset: int = 0, limit: int = 100) -> list[str]:
    """A tenant's model ids, newest first."""
    return store.list_ids(connection, owner=tenant, offset=offset, limit=limit)


def count(connection, tenant: str) -> int:
    return store.count(connection, owner=tenant)


def delete(connection, model_id: str) -> bool:
    return store.delete(connection, model_id)


def adopt_untenanted(connection) -> int:
    """Move models indexed before tenants existed (one shared index) into tenant `default`'s index,
    whose owner they already are (attnseg.ownership); idempotent. Returns how many were moved."""
    legacy = ONESHOT_INDEX_KEY
    if not connection.exists(legacy):
        return 0
    moved = connection.zcard(legacy)
    with connection.pipeline() as pipe:
        pipe.zunionstore(store.index_key(DEFAULT_TENANT), [store.index_key(DEFAULT_TENANT), legacy], aggregate="MIN")
        pipe.delete(legacy)
        pipe.execute()
    return moved
