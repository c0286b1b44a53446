"""Turning a checked request into a queued job: admission (queue and tenant caps), then storage.

Every check that can refuse a request runs before anything is written: auth, body size, fields
and pictures before `submit_job` is called, and the caps inside it, under one Redis lock shared by
every API replica, so count-then-enqueue cannot overshoot. Only then are the pictures stored and
the job enqueued. A refused request leaves Redis as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager

import redis
from fastapi import Response

from attnseg.images import mask_png, store_bytes
from attnseg.ownership import stamp
from attnseg.queue import (
    ADMISSION_LOCK_KEY,
    WAITING,
    enqueue,
    job_kind,
    job_statuses,
    live_queued_count,
    tenant_jobs_key,
)
from attnseg.settings import Settings
from service.errors import ApiError
from service.job_view import job_view
from service.uploads import CheckedImage

log = logging.getLogger("attnseg.api")

LOCK_TIMEOUT_S = 10  # a crashed API replica's lock lapses after this


def image_entry(connection, image: CheckedImage, settings: Settings) -> dict:
    """Store an upload as received; the entry a job payload carries (upright size included)."""
    return {
        "key": store_bytes(connection, image.data, settings.image_ttl_s),
        "width": image.width,
        "height": image.height,
    }


def checked_mask(mask) -> CheckedImage:
    """(H, W) class ids, already checked -> the normalised 8-bit PNG to store (kept compressed, not decoded)."""
    height, width = mask.shape
    return CheckedImage(mask_png(mask.astype("uint8", copy=False)), width, height)


def check_caps(connection, settings: Settings, tenant: str, queue: str) -> list[str]:
    """Raise 429 when the queue or the tenant is at its cap; returns the tenant's jobs that ended."""
    depth = live_queued_count(connection, queue)
    if depth >= settings.max_queued_jobs:
        raise ApiError(
            429,
            "queue_full",
            f"the {queue} queue is full ({depth} jobs, the limit of ATTNSEG_MAX_QUEUED_JOBS); retry later",
            headers={"Retry-After": "30"},
        )
    if settings.max_queued_per_tenant is None:
        return []
    ids = [job_id.decode() for job_id in connection.smembers(tenant_jobs_key(tenant))]
    statuses = job_statuses(connection, ids)
    waiting = sum(status in WAITING for status in statuses)
    if waiting >= settings.max_queued_per_tenant:
        raise ApiError(
            429,
            "tenant_queue_full",
            f"you have {waiting} queued jobs, the limit per tenant "
            f"({settings.max_queued_per_tenant}); retry when some have "
            "started",
            headers={"Retry-After": "30"},
        )
    return [job_id for job_id, status in zip(ids, statuses) if status not in WAITING]


def track_tenant_job(connection, settings: Settings, tenant: str, job_id: str, ended: list[str]) -> None:
    """Add a new job to the tenant's set and drop the ones that no longer wait."""
    key = tenant_jobs_key(tenant)
    with connection.pipeline(transaction=False) as pipe:
        pipe.sadd(key, job_id)
        if ended:
            pipe.srem(key, *ended)
        pipe.expire(key, settings.queued_ttl_s + settings.train_timeout_s)  # the longest a job can wait
        pipe.execute()


@contextmanager
def admission_lock(connection):
    lock = connection.lock(ADMISSION_LOCK_KEY, timeout=LOCK_TIMEOUT_S, blocking_timeout=LOCK_TIMEOUT_S)
    if not lock.acquire():
        raise ApiError(
            503, "busy", "the job store is busy admitting other jobs; retry shortly", headers={"Retry-After": "1"}
        )
    try:
        yield
    finally:
        try:
            lock.release()
        except redis.exceptions.LockError:  # held past its timeout (a very slow store): it lapsed already
            log.warning("admission lock expired before release; raise LOCK_TIMEOUT_S if this recurs")


def submit_job(
    connection,
    settings: Settings,
    response: Response,
    tenant: str,
    kind: str,
    build_payload: Callable[[], dict],
    **enqueue_options,
) -> dict:
    """Admit, then `build_payload()` (which stores the pictures) and enqueue; the job's view, 202 headers set.

    enqueue_options: job_id, after, extra_meta (see attnseg.queue.enqueue).
    """
    extra_meta = stamp(enqueue_options.pop("extra_meta", {}), tenant)
    with admission_lock(connection):
        ended = check_caps(connection, settings, tenant, job_kind(kind).queue)
        job = enqueue(connection, settings, kind, build_payload(), extra_meta=extra_meta, **enqueue_options)
        if settings.max_queued_per_tenant is not None:
            track_tenant_job(connection, settings, tenant, job.id, ended)
    response.headers["Location"] = f"/jobs/{job.id}"
    return job_view(connection, job, settings)
