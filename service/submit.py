"""Turning a checked request into a queued job: admission (queue and tenant caps), then storage.

Every check that can refuse a request runs before anything is written: auth, body size, fields
and pictures before `submit_job` is called, and the caps inside it, where one Redis script counts
the waiting jobs and reserves a slot atomically, so replicas never overshoot. Then the pictures
are stored and the job enqueued with no lock held, so large uploads do not wait for each other.
A refused request leaves Redis as it was.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from fastapi import Response
from rq.job import Job

from attnseg.images import mask_png, store_bytes
from attnseg.ownership import stamp
from attnseg.queue import WAITING, enqueue, get_queue, job_kind, tenant_jobs_key
from attnseg.settings import Settings
from service.errors import ApiError
from service.job_view import job_view
from service.uploads import CheckedImage


def image_entry(connection, image: CheckedImage, settings: Settings, tenant: str) -> dict:
    """Store the tenant's upload as received; the entry a job payload carries (upright size included)."""
    return {
        "key": store_bytes(connection, tenant, image.data, settings.image_ttl_s),
        "width": image.width,
        "height": image.height,
    }


def checked_mask(mask) -> CheckedImage:
    """(H, W) class ids, already checked -> the normalised 8-bit PNG to store (kept compressed, not decoded)."""
    height, width = mask.shape
    return CheckedImage(mask_png(mask.astype("uint8", copy=False)), width, height)


RESERVATION_MS = 120_000  # a slot reserved by an API replica that died before enqueueing lapses after this

# Count live waiting jobs plus reserved slots, refuse at a cap, else reserve one slot: in one script,
# so replicas never overshoot and nobody holds a lock while pictures are written. It reads the RQ
# job hashes it finds in the lists (keys it is not passed): fine on one Redis, not on a cluster.
# KEYS: queue list, queue reservations, tenant jobs, tenant reservations.
# ARGV: job key prefix, queue cap, tenant cap (-1: none), token, reservation ms, waiting statuses...
RESERVE_SCRIPT = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local waiting = {}
for i = 6, #ARGV do waiting[ARGV[i]] = true end
local function live(id)
  local status = redis.call('HGET', ARGV[1] .. id, 'status')
  return status and waiting[status]
end
local function count(reservations, ids, ended)
  redis.call('ZREMRANGEBYSCORE', reservations, '-inf', now)
  local n = redis.call('ZCARD', reservations)
  for _, id in ipairs(ids) do
    if live(id) then n = n + 1 elseif ended then table.insert(ended, id) end
  end
  return n
end
local depth = count(KEYS[2], redis.call('LRANGE', KEYS[1], 0, -1), nil)
if depth >= tonumber(ARGV[2]) then return {'queue_full', depth} end
local ended = {}
if tonumber(ARGV[3]) >= 0 then
  local mine = count(KEYS[4], redis.call('SMEMBERS', KEYS[3]), ended)
  if mine >= tonumber(ARGV[3]) then return {'tenant_queue_full', mine} end
  redis.call('ZADD', KEYS[4], now + tonumber(ARGV[5]), ARGV[4])
  redis.call('PEXPIRE', KEYS[4], ARGV[5])
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return {'ok', 0, unpack(ended)}
"""


def reservation_keys(queue: str, tenant: str) -> list[str]:
    """Sorted sets of reserved slots (token -> lapse time, ms) for a queue and a tenant."""
    return [f"attnseg:reserved:{queue}", f"attnseg:reserved-tenant:{tenant}"]


def reserve_slot(connection, settings: Settings, tenant: str, queue: str, token: str) -> list[str]:
    """Reserve one slot under the queue and tenant caps, or raise 429 having written nothing.

    Returns the tenant's jobs that no longer wait (to prune from its set).
    """
    queue_reserved, tenant_reserved = reservation_keys(queue, tenant)
    cap = settings.max_queued_per_tenant
    outcome, count, *ended = connection.register_script(RESERVE_SCRIPT)(
        keys=[get_queue(connection, queue).key, queue_reserved, tenant_jobs_key(tenant), tenant_reserved],
        args=[
            Job.redis_job_namespace_prefix,
            settings.max_queued_jobs,
            -1 if cap is None else cap,
            token,
            RESERVATION_MS,
            *WAITING,
        ],
    )
    if outcome == b"queue_full":
        raise ApiError(
            429,
            "queue_full",
            f"the {queue} queue is full ({count} jobs, the limit of ATTNSEG_MAX_QUEUED_JOBS); retry later",
            headers={"Retry-After": "30"},
        )
    if outcome == b"tenant_queue_full":
        raise ApiError(
            429,
            "tenant_queue_full",
            f"you have {count} queued jobs, the limit per tenant ({cap}); retry when some have started",
            headers={"Retry-After": "30"},
        )
    return [job_id.decode() for job_id in ended]


def release_slot(connection, tenant: str, queue: str, token: str) -> None:
    """Drop a reservation once its job is in the queue (or its storage failed)."""
    with connection.pipeline(transaction=False) as pipe:
        for key in reservation_keys(queue, tenant):
            pipe.zrem(key, token)
        pipe.execute()


def track_tenant_job(connection, settings: Settings, tenant: str, job_id: str, ended: list[str]) -> None:
    """Add a new job to the tenant's set and drop the ones that no longer wait."""
    key = tenant_jobs_key(tenant)
    with connection.pipeline(transaction=False) as pipe:
        pipe.sadd(key, job_id)
        if ended:
            pipe.srem(key, *ended)
        pipe.expire(key, settings.queued_ttl_s + settings.train_timeout_s)  # the longest a job can wait
        pipe.execute()


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
    queue, token = job_kind(kind).queue, uuid.uuid4().hex
    ended = reserve_slot(connection, settings, tenant, queue, token)
    try:
        job = enqueue(connection, settings, kind, build_payload(), extra_meta=extra_meta, **enqueue_options)
        if settings.max_queued_per_tenant is not None:
            track_tenant_job(connection, settings, tenant, job.id, ended)
    finally:  # the job now counts in the queue itself (or was never made)
        release_slot(connection, tenant, queue, token)
    response.headers["Location"] = f"/jobs/{job.id}"
    return job_view(connection, job, settings)
