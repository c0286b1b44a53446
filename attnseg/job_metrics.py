"""Job duration histograms kept in Redis: workers record, any API replica exposes them.

One Redis hash holds, per (kind, outcome), the count of each bucket (the first bound at or above
the duration), a count and a sum: three increments per job in one round trip. Reading makes the
counts cumulative, so Prometheus sees cluster-wide numbers whichever API replica it scrapes.
"""

from __future__ import annotations

from attnseg.queue import JOB_METRICS_KEY

BUCKETS_S = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


def record_job_duration(connection, kind: str, outcome: str, seconds: float) -> None:
    prefix = f"{kind}|{outcome}"
    with connection.pipeline(transaction=False) as pipe:
        bucket = next((bound for bound in BUCKETS_S if seconds <= bound), None)
        if bucket is not None:  # beyond the last bound: only in count (Prometheus' +Inf)
            pipe.hincrby(JOB_METRICS_KEY, f"{prefix}|in|{bucket}", 1)
        pipe.hincrby(JOB_METRICS_KEY, f"{prefix}|count", 1)
        pipe.hincrbyfloat(JOB_METRICS_KEY, f"{prefix}|sum", seconds)
        pipe.execute()


def read_job_durations(connection) -> dict[tuple[str, str], dict]:
    """{(kind, outcome): {"buckets": [(bound, cumulative count)], "count": n, "sum": s}}."""
    out: dict[tuple[str, str], dict] = {}
    for field, value in connection.hgetall(JOB_METRICS_KEY).items():
        kind, outcome, *rest = field.decode().split("|")
        entry = out.setdefault((kind, outcome), {"in": {}, "count": 0, "sum": 0.0})
        if rest[0] == "in":
            entry["in"][float(rest[1])] = int(value)
        elif rest[0] == "count":
            entry["count"] = int(value)
        elif rest[0] == "sum":
            entry["sum"] = float(value)
    for entry in out.values():
        running, buckets = 0, []
        for bound in BUCKETS_S:
            running += entry["in"].get(float(bound), 0)
            buckets.append((bound, running))
        entry["buckets"] = buckets
        del entry["in"]
    return out
