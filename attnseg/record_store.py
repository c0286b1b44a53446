"""Durable records in Redis (no TTL) for trained artefacts: one-shot models, concepts.

A record is a JSON document under `<prefix>:<id>` with an owner (the tenant that created it,
attnseg.ownership); a sorted set per owner indexes the records by creation time, so a caller lists
only its own. Large binary parts (weights files) live beside the record under
`<prefix>:<id>:file:<name>`, named in the record's `files`, and go with it on delete.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone

import redis

from attnseg.ownership import owned_by, owner_of, stamp


def new_id() -> str:
    return uuid.uuid4().hex


class RecordStore:
    def __init__(self, prefix: str, index_key: str):
        self.prefix = prefix
        self._index_key = index_key

    def key(self, record_id: str) -> str:
        return f"{self.prefix}:{record_id}"

    def index_key(self, owner: str) -> str:
        return f"{self._index_key}:{owner}"

    def file_key(self, record_id: str, name: str) -> str:
        return f"{self.key(record_id)}:file:{name}"

    def create(self, connection, record_id: str, fields: dict, *, owner: str) -> dict:
        now = datetime.now(timezone.utc)
        record = stamp({"id": record_id, "created_at": now.isoformat(), "error": None, "files": [], **fields}, owner)
        with connection.pipeline() as pipe:
            pipe.set(self.key(record_id), json.dumps(record))
            pipe.zadd(self.index_key(owner), {record_id: now.timestamp()})
            pipe.execute()
        return record

    def get(self, connection, record_id: str, *, owner: str) -> dict | None:
        """The record, or None when there is none or it belongs to another owner."""
        record = self.get_any(connection, record_id)
        return record if owned_by(record, owner) else None

    def get_any(self, connection, record_id: str) -> dict | None:
        """The record whoever owns it (workers act for the owner who queued the job)."""
        data = connection.get(self.key(record_id))
        return json.loads(data) if data is not None else None

    def update(self, connection, record_id: str, **fields) -> dict | None:
        """Update fields of an existing record; None when it was deleted meanwhile (nothing is recreated)."""
        key = self.key(record_id)
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

    def put_file(self, connection, record_id: str, name: str, data: bytes) -> dict | None:
        """Store a binary part and name it in the record; None (nothing kept) when the record is gone."""
        connection.set(self.file_key(record_id, name), data)
        record = self.get_any(connection, record_id)
        if record is None:
            connection.delete(self.file_key(record_id, name))
            return None
        return self.update(connection, record_id, files=sorted({*record["files"], name}))

    def get_file(self, connection, record_id: str, name: str) -> bytes | None:
        return connection.get(self.file_key(record_id, name))

    def drop_file(self, connection, record_id: str, name: str) -> None:
        connection.delete(self.file_key(record_id, name))
        record = self.get_any(connection, record_id)
        if record is not None:
            self.update(connection, record_id, files=[f for f in record["files"] if f != name])

    def list_ids(self, connection, *, owner: str, offset: int = 0, limit: int = 100) -> list[str]:
        return [i.decode() for i in connection.zrevrange(self.index_key(owner), offset, offset + limit - 1)]

    def count(self, connection, *, owner: str) -> int:
        return connection.zcard(self.index_key(owner))

    def delete(self, connection, record_id: str) -> bool:
        record = self.get_any(connection, record_id)
        if record is None:
            return False
        with connection.pipeline() as pipe:
            pipe.delete(self.key(record_id), *(self.file_key(record_id, name) for name in record.get("files", [])))
            pipe.zrem(self.index_key(owner_of(record)), record_id)
            pipe.execute()
        return True
