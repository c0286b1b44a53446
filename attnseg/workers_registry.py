"""Worker announcements: each ready worker keeps a short-lived key saying what it holds."""

from __future__ import annotations

import json

from attnseg.queue import WORKER_KEY_PATTERN, worker_key


def announce(connection, info: dict, ttl_s: int) -> None:
    connection.set(worker_key(info["name"]), json.dumps(info), ex=ttl_s)


def withdraw(connection, name: str) -> None:
    connection.delete(worker_key(name))


def ready_workers(connection) -> list[dict]:
    keys = sorted(connection.scan_iter(match=WORKER_KEY_PATTERN, count=100))
    values = connection.mget(keys) if keys else []
    return [json.loads(value) for value in values if value is not None]
