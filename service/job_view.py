"""RQ job -> the API's job object. Everything comes from Redis: any API replica answers any id."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from rq.job import Job as RQJob
from rq.job import JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from attnseg.settings import Settings

STATUS = {
    JobStatus.CREATED: "queued",
    JobStatus.QUEUED: "queued",
    JobStatus.DEFERRED: "queued",
    JobStatus.SCHEDULED: "queued",
    JobStatus.READY_TO_ENQUEUE: "queued",
    JobStatus.RATE_LIMITED: "queued",
    JobStatus.STARTED: "running",
    JobStatus.FINISHED: "succeeded",
    JobStatus.FAILED: "failed",
    JobStatus.STOPPED: "canceled",
    JobStatus.CANCELED: "canceled",
}


def utc(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def reap_abandoned(connection, queue_name: str) -> None:
    """Fail jobs whose worker stopped heart-beating (RQ's own abandoned-job path).

    Workers keep each running job's registry entry alive for `worker_lost_after_s`; a worker that
    dies stops doing so, and the cleanup moves the job to failed.
    """
    StartedJobRegistry(queue_name, connection=connection, serializer=JSONSerializer).cleanup()


def error_of(job: RQJob, meta: dict) -> dict | None:
    if "error" in meta:
        return meta["error"]
    exc = job.exc_info or ""
    # RQ's words for a job whose worker died, or lost Redis, while it held the job.
    if "AbandonedJobError" in exc or "stuck in intermediate queue" in exc:
        return {
            "code": "worker_lost",
            "message": "the worker running this job stopped responding (crashed, was killed or lost Redis); "
            "submit it again",
        }
    if any(f"redis.exceptions.{name}" in exc for name in ("ConnectionError", "TimeoutError")):
        return {
            "code": "store_unavailable",
            "message": "the job store (Redis) became unreachable while the job ran; submit it again",
        }
    if exc:
        return {"code": "internal_error", "message": "the job failed in the worker; this is a bug, please report it"}
    return {"code": "expired", "message": "the job expired before a worker took it"}


def ended_at(job: RQJob, meta: dict) -> datetime | None:
    """RQ records the end of a success on the job, of a failure on its Result; a cancel in our meta."""
    if job.ended_at:
        return utc(job.ended_at)
    result = job.latest_result()
    if result is not None:
        return utc(result.created_at)
    return datetime.fromisoformat(meta["finished_at"]) if "finished_at" in meta else None


def job_view(connection, job: RQJob, settings: Settings) -> dict:
    status_rq = job.get_status(refresh=False)
    if status_rq == JobStatus.STARTED:
        reap_abandoned(connection, job.origin)
        job.refresh()
        status_rq = job.get_status(refresh=False)
    meta = job.get_meta(refresh=False)
    # The worker marks a canceled job in its meta just before RQ records the end: until RQ has
    # (and so knows when it ended), the job is still running.
    ended_rq = status_rq in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED)
    status = "canceled" if meta.get("canceled") and ended_rq else STATUS.get(status_rq, "queued")

    finished_at = ended_at(job, meta) if status in ("succeeded", "failed", "canceled") else None
    expires_at = None
    if finished_at is not None:
        expires_at = finished_at + timedelta(seconds=settings.result_ttl_s)
    elif status == "queued" and job.ttl:
        # A job waiting on a training job has a longer queued TTL than ATTNSEG_QUEUED_TTL_S: use the job's own.
        expires_at = utc(job.enqueued_at or job.created_at) + timedelta(seconds=job.ttl)

    result = None
    if status == "succeeded":
        result = job.return_value(refresh=True)
        if isinstance(result, dict) and "timings_ms" in result and job.started_at and job.enqueued_at:
            queued_ms = (utc(job.started_at) - utc(job.enqueued_at)).total_seconds() * 1000
            result = {**result, "timings_ms": {"queue": round(queued_ms, 1), **result["timings_ms"]}}

    progress = meta.get("progress") or {"stage": "queued", "fraction": 0.0}
    if status_rq == JobStatus.DEFERRED:
        progress = {"stage": "waiting for the model's training", "fraction": 0.0}
    if status == "succeeded":
        progress = {**progress, "stage": "done", "fraction": 1.0}
    return {
        "id": job.id,
        "model_id": meta.get("model_id"),
        "concept_id": meta.get("concept_id"),
        "kind": meta.get("kind", "unsupervised"),
        "status": status,
        "progress": progress,
        "created_at": utc(job.created_at),
        "started_at": utc(job.started_at),
        "finished_at": finished_at,
        "expires_at": expires_at,
        "params": meta.get("params", {}),
        "result": result,
        "error": error_of(job, meta) if status == "failed" else None,
    }
