"""The queue contract between the API and the workers: queues, job kinds, Redis keys, progress.

Jobs are enqueued by dotted path with JSON arguments (RQ's JSON serializer, never pickle), so
the API never imports the worker code or torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from rq import Queue
from rq.job import Dependency, Job, JobStatus
from rq.registry import CanceledJobRegistry
from rq.serializers import JSONSerializer

from attnseg.record_store import new_id
from attnseg.settings import Settings

SEGMENT_QUEUE = "attnseg:segment"
TRAIN_QUEUE = "attnseg:train"
QUEUES = (SEGMENT_QUEUE, TRAIN_QUEUE)  # a worker serves them in this order: quick jobs first


@dataclass(frozen=True)
class JobKind:
    """One kind of job, the single table both sides read: the API enqueues `func`, the worker builds
    its dispatch (workers.engine.dispatch) from `func`, `picture_side` and `batch`. Worker code is named
    by dotted path, so the API never imports it (tests/test_job_kinds.py checks every path resolves)."""

    name: str
    queue: str
    func: str  # dotted path of the job function in the worker
    long: bool = False  # training: the long timeout applies
    picture_side: str | None = None  # dotted path of `side(params) -> int`: decode its picture ahead at that size
    batch: str | None = None  # dotted path of a workers.engine.batch.Batch: queued jobs may share a model pass

    def timeout(self, settings: Settings) -> int:
        return settings.train_timeout_s if self.long else settings.segment_timeout_s


_JOBS = "workers.engine.jobs"
_CONCEPT_JOBS = "workers.engine.concept_jobs"
_RESOLUTION_SIDE = f"{_JOBS}.resolution_side"

KINDS = {
    kind.name: kind
    for kind in (
        JobKind(
            "unsupervised",
            SEGMENT_QUEUE,
            f"{_JOBS}.segment_unsupervised",
            picture_side=_RESOLUTION_SIDE,
            batch=f"{_JOBS}.UNSUPERVISED_BATCH",
        ),
        JobKind(
            "text",
            SEGMENT_QUEUE,
            f"{_JOBS}.segment_text",
            picture_side=f"{_JOBS}.text_side",
            batch=f"{_JOBS}.TEXT_BATCH",
        ),
        JobKind("oneshot_train", TRAIN_QUEUE, f"{_JOBS}.oneshot_train", long=True),
        JobKind("oneshot_segment", SEGMENT_QUEUE, f"{_JOBS}.oneshot_segment", picture_side=_RESOLUTION_SIDE),
        JobKind("concept_train", TRAIN_QUEUE, f"{_CONCEPT_JOBS}.concept_train", long=True),
        JobKind("concept_import", SEGMENT_QUEUE, f"{_CONCEPT_JOBS}.concept_import"),
        JobKind("referring", SEGMENT_QUEUE, f"{_CONCEPT_JOBS}.segment_referring"),
    )
}


def job_kind(name: str) -> JobKind:
    """The registered kind `name`; ValueError for any other (a typo in a router or a job function)."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown job kind {name!r}; known: {', '.join(KINDS)}") from None


def connect(url: str) -> redis.Redis:
    """Bytes in, bytes out (RQ stores binary fields). Commands are retried for a few seconds, so a
    Redis restart is invisible to callers; a longer outage raises redis.ConnectionError."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=5,
        socket_timeout=30,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=5),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def get_queue(connection: redis.Redis, name: str) -> Queue:
    return Queue(name, connection=connection, serializer=JSONSerializer)


WAITING = (JobStatus.QUEUED.value, JobStatus.DEFERRED.value, JobStatus.SCHEDULED.value)


def job_statuses(connection: redis.Redis, job_ids: list[str]) -> list[str | None]:
    """RQ status of each job id in one round trip; None for a job that no longer exists (expired)."""
    with connection.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(Job.key_for(job_id), "status")
        return [status.decode() if status else None for status in pipe.execute()]


def clean_canceled(connection: redis.Redis, name: str) -> int:
    """Drop entries of queue `name`'s canceled registry whose job is gone (RQ never prunes it)."""
    key = CanceledJobRegistry(name, connection=connection, serializer=JSONSerializer).key
    ids = [job_id.decode() for job_id in connection.zrange(key, 0, -1)]
    gone = [job_id for job_id, status in zip(ids, job_statuses(connection, ids)) if status is None]
    return connection.zrem(key, *gone) if gone else 0


def enqueue(
    connection: redis.Redis,
    settings: Settings,
    kind: str,
    payload: dict,
    *,
    job_id: str | None = None,
    extra_meta: dict | None = None,
    after: str | None = None,
):
    """Enqueue one job of `kind` with a JSON `payload` (admission, the caps included, is the API's).

    `payload["params"]` is echoed in the job object; the rest (image keys) is for the worker.
    `after`: a job id this one waits for (it runs whether that job succeeds or fails, and says so).
    `job_id`: given when a record must name its job before it exists; else a new one (every job id
    has the same shape: 32 hex digits, as record ids).
    """
    kind_entry = job_kind(kind)
    queue = get_queue(connection, kind_entry.queue)
    meta = {"kind": kind, "params": payload["params"], "progress": {"stage": "queued", "fraction": 0.0}}
    meta.update(extra_meta or {})
    waiting = Dependency(jobs=[after], allow_failure=True) if after else None
    queued_ttl = settings.queued_ttl_s + (job_kind("oneshot_train").timeout(settings) if after else 0)
    return queue.enqueue_call(
        kind_entry.func,
        args=(payload,),
        timeout=kind_entry.timeout(settings),
        ttl=queued_ttl,
        depends_on=waiting,
        result_ttl=settings.result_ttl_s,
        failure_ttl=settings.result_ttl_s,
        job_id=job_id or new_id(),
        meta=meta,
        description=f"{kind} job",
    )


# Redis keys owned by attnseg (RQ's own keys live under "rq:").
def image_key(owner: str, digest: str) -> str:
    """A tenant's picture (tenant names have no ':')."""
    return f"attnseg:image:{owner}:{digest}"


def cancel_key(job_id: str) -> str:
    return f"attnseg:cancel:{job_id}"


# A job's events ("progress", "end") are published on its own channel; an API process listens to all
# of them through one pattern subscription and wakes the requests waiting on that job.
JOB_EVENTS_PATTERN = "attnseg:job-events:*"


def job_events_channel(job_id: str) -> str:
    return f"attnseg:job-events:{job_id}"


def publish_job_event(connection, job_id: str, event: str) -> None:
    """`connection` may be a pipeline: the event then goes out with the writes it announces."""
    connection.publish(job_events_channel(job_id), event)


def worker_key(name: str) -> str:
    return f"attnseg:worker:{name}"


WORKER_KEY_PATTERN = "attnseg:worker:*"


def tenant_jobs_key(tenant: str) -> str:
    """Ids of a tenant's recent jobs (for its queued-job cap; pruned as they end)."""
    return f"attnseg:tenant-jobs:{tenant}"


# Durable records (attnseg.record_store): <prefix>:<id>, and an index per owner <index>:<tenant>.
ONESHOT_PREFIX = "attnseg:oneshot"
ONESHOT_INDEX_KEY = "attnseg:oneshot-index"
CONCEPT_PREFIX = "attnseg:concept"
CONCEPT_INDEX_KEY = "attnseg:concept-index"


def concept_identifier_key(owner: str, identifier: str) -> str:
    """identifier -> concept id, one per owner: queries name concepts by identifier."""
    return f"attnseg:concept-identifier:{owner}:{identifier.lower()}"


JOB_METRICS_KEY = "attnseg:metrics:jobs"
