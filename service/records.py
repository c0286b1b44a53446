"""What the API shows of a stored artefact (one-shot model, concept) made by a job: its job's
progress while it is made, failure when that job ended without the worker saying so, and cancel."""

from __future__ import annotations

from datetime import datetime, timezone

from rq.exceptions import NoSuchJobError
from rq.job import Job as RQJob
from rq.serializers import JSONSerializer

from attnseg.queue import cancel_key, publish_job_event
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
    """Cancel a job that has not ended: a queued one never runs (jobs waiting on it run and say why
    they cannot); a running one stops at its next progress report. The stop flag is set in both
    cases: a worker may be taking the job off the queue at this very moment, and it then stops at
    its first report."""
    status = job_view(connection, job, settings)["status"]
    if status not in ("queued", "running"):
        return
    connection.set(cancel_key(job.id), 1, ex=settings.result_ttl_s)
    if status == "queued":
        job.meta["finished_at"] = datetime.now(timezone.utc).isoformat()
        job.save_meta()
        job.cancel(enqueue_dependents=True)
        publish_job_event(connection, job.id, "end")


def cancel_job(connection, job_id: str, settings: Settings) -> None:
    """`cancel` by id; nothing to do for a job that no longer exists."""
    try:
        job = fetch_job(connection, job_id)
    except NoSuchJobError:
        return
    cancel(connection, job, settings)
