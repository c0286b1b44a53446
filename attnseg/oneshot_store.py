"""Trained one-shot (SLiMe) models, stored durably in Redis (no TTL) so any worker can use them.

A model record is a JSON document: id, status (training | ready | failed), labels, the SD model
it belongs to, training parameters and metrics, the training job id, and (when ready) the learned
vectors. An index sorted by creation time lists them.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone

import redis

from attnseg.ownership import owner_of, stamp
from attnseg.queue import oneshot_index_key, oneshot_model_key


def new_model_id() -> str:
    return uuid.uuid4().hex


def create(connection, model_id: str, *, tenant: str, labels: list[str], params: dict, train_job_id: str) -> dict:
    now = datetime.now(timezone.utc)
    record = stamp({"id": model_id, "status": "training", "labels": labels, "params": params, "sd_model": None,
                    "train_job_id": train_job_id, "created_at": now.isoformat(), "metrics": {}, "error": None},
                   tenant)
    with connection.pipeline() as pipe:
        pipe.set(oneshot_model_key(model_id), json.dumps(record))
        pipe.zadd(oneshot_index_key(tenant), {model_id: now.timestamp()})
        pipe.execute()
    return record


def get(connection, model_id: str) -> dict | None:
    data = connection.get(oneshot_model_key(model_id))
    return json.loads(data) if data is not None else None


def update(connection, model_id: str, **fields) -> dict | None:
    """Update fields of an existing record; None when it was deleted meanwhile (nothing is recreated)."""
    key = oneshot_model_key(model_id)
    with connection.pipeline() as pipe:
        while True:
            try:
                pipe.watch(key)
                data = pipe.get(key)
                if data is None:
                    pipe.unwatch()
                    return None
                record = {**json.loads(data), **fields}
                pipe.multi()
                pipe.set(key, json.dumps(record))
                pipe.execute()
                return record
            except redis.WatchError:  # a concurrent update: read again
                continue


def list_ids(connection, tenant: str, *, offset: int = 0, limit: int = 100) -> list[str]:
    """A tenant's model ids, newest first."""
    return [i.decode() for i in connection.zrevrange(oneshot_index_key(tenant), offset, offset + limit - 1)]


def count(connection, tenant: str) -> int:
    return connection.zcard(oneshot_index_key(tenant))


def delete(connection, record: dict) -> bool:
    with connection.pipeline() as pipe:
        pipe.delete(oneshot_model_key(record["id"]))
        pipe.zrem(oneshot_index_key(owner_of(record)), record["id"])
        deleted, _ = pipe.execute()
    return bool(deleted)
