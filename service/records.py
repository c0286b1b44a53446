"""What the API shows of a stored artefact (one-shot model, concept) made by a job: its job's
progress while it is made, failure when that job ended without the worker saying so, and cancel."""

from __future__ import annotations

from datetime import datetime, timezone

from redis.exceptions import WatchError
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job as RQJob
from rq.serializers import JSONSerializer

from attnseg.queue import WAITING, cancel_key, publish_job_event
from attnseg.settings import Settings
from service.job_view import job_view


def fetch_job(connection, job_id: str) -> RQJob:
    return RQJob.fetch(job_id, connection=connection, serializer=JSONSerializer)


def with_job_state(connection, view: dict, job_id: str, settings: Settings) -> dict:
    """view: the record as shown, still in the making (status training/importing). Adds its job's
    progress; a job that failed or was canceled makes the view failed with the job's error."""
    try:
        job = job_view(connection, fetch_job(connection, job_id), settings)
    except NoSuchJobError:
        job = {
            "status": "failed",
            "progress": None,
            "error": {"code": "expired", "message": "the job making it no longer exists"},
        }
    view["progress"] = job["progress"]
    if job["status"] in ("failed", "canceled"):
        view["status"] = "failed"
        view["error"] = job["error"] or {"code": "canceled", "message": "it was canceled"}
    return view


def cancel(connection, job: RQJob, settings: Settings) -> None:
    """Cancel a job that has not ended, whatever the worker does meanwhile: a queued one never runs
    (jobs waiting on it run and say why they cannot); a running one stops at its next progress
    report; an ended, canceled or vanished one is left as it is. The stop flag is set whenever the
    job was seen unended: a worker may be taking it off the queue at this very moment, and it then
    stops at its first report."""
    if job_view(connection, job, settings)["status"] not in ("queued", "running"):
        return
    connection.set(cancel_key(job.id), 1, ex=settings.result_ttl_s)
    if cancel_waiting(connection, job):
        publish_job_event(connection, job.id, "end")


def cancel_waiting(connection, job: RQJob) -> bool:
    """RQ's cancel of `job` if it is still waiting to run, in one transaction with that check (a
    WATCH on the job): False when it was not, because a worker took it, it ended, another cancel
    came first or it expired. Its dependents are then enqueued (RQ's allow_failure)."""
    with connection.pipeline() as pipe:
        pipe.watch(job.key)
        if not waiting(connection, job):
            return False
        job.meta["finished_at"] = datetime.now(timezone.utc).isoformat()
        pipe.multi()
        pipe.hset(job.key, "meta", job.serializer.dumps(job.meta))  # as job.save_meta(), in the transaction
        try:
            job.cancel(pipeline=pipe)
            pipe.execute()
        except WatchError:
            return False
        except ValueError:
            # RQ looked up the executions of a job that had started after the WATCH and found one
            # its worker had just removed: the job is no longer waiting, EXEC would have failed.
            if waiting(connection, job):
                raise
            return False
    Queue(job.origin, connection=connection, serializer=JSONSerializer).enqueue_dependents(job)
    return True


def cancel_job(connection, job_id: str, settings: Settings) -> None:
    """`cancel` by id; nothing to do for a job that no longer exists."""
    try:
        job = fetch_job(connection, job_id)
    except NoSuchJobError:
        return
    cancel(connection, job, settings)


def waiting(connection, job: RQJob) -> bool:
    """The job, as stored now, waits to run (queued or deferred); False when it is gone."""
    status = connection.hget(job.key, "status")
    return status is not None and status.decode() in WAITING
