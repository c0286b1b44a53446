"""GET/DELETE /jobs/{id} and the overlay picture."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone

from fastapi import APIRouter, Depends, Query, Response
from rq.exceptions import NoSuchJobError
from rq.job import Job as RQJob
from rq.serializers import JSONSerializer
from starlette.concurrency import run_in_threadpool

from attnseg.images import ImageMissingError, load_image
from attnseg.queue import cancel_key, publish_job_event
from attnseg.settings import Settings
from service.deps import get_job_events, get_redis, get_settings, require_api_key
from service.errors import ApiError
from service.job_events import JobEvents
from service.job_view import job_view
from service.overlay import render_overlay
from service.schemas import ErrorResponse, Job

router = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[Depends(require_api_key)])

FINAL = ("succeeded", "failed", "canceled")
RECHECK_S = 5.0  # a waited-for job is re-read this often anyway (its worker lost, a signal missed)
POLL_S = 0.05  # ... and this often while the job-event subscription is down


def fetch_job(connection, job_id: str) -> RQJob:
    try:
        job = RQJob.fetch(job_id, connection=connection, serializer=JSONSerializer)
    except NoSuchJobError:
        job = None
    if job is None or "kind" not in job.get_meta(refresh=False):
        raise ApiError(404, "not_found", f"no job with id '{job_id}' (finished jobs are kept for a limited time, "
                                         "see expires_at)", field="job_id")
    return job


@router.get("/{job_id}", response_model=Job, responses={404: {"model": ErrorResponse}})
async def get_job(job_id: str, wait: float = Query(0, ge=0, le=60, description="Hold up to this many seconds "
                                                                                "until the job ends."),
                  settings: Settings = Depends(get_settings), connection=Depends(get_redis),
                  job_events: JobEvents = Depends(get_job_events)):
    deadline = time.monotonic() + wait
    with job_events.watch(job_id) as ended:
        while True:
            ended.clear()  # before the read: an end signalled after it wakes the wait below
            view = await run_in_threadpool(lambda: job_view(connection, fetch_job(connection, job_id), settings))
            if wait_is_over(view, deadline):
                return view
            pause = RECHECK_S if job_events.listening else POLL_S
            try:
                await asyncio.wait_for(ended.wait(), timeout=min(pause, max(0.0, deadline - time.monotonic())))
            except asyncio.TimeoutError:
                pass


def wait_is_over(view: dict, deadline: float) -> bool:
    """A long-poll answers when the job has ended or its wait is up."""
    return view["status"] in FINAL or time.monotonic() >= deadline


@router.delete("/{job_id}", response_model=Job, responses={404: {"model": ErrorResponse}})
def cancel_job(job_id: str, settings: Settings = Depends(get_settings), connection=Depends(get_redis)):
    """Cancels a queued job at once; asks a running one to stop (the worker checks between steps)."""
    job = fetch_job(connection, job_id)
    view = job_view(connection, job, settings)
    if view["status"] == "queued":
        job.meta["finished_at"] = datetime.now(timezone.utc).isoformat()
        job.save_meta()
        job.cancel(enqueue_dependents=True)  # jobs waiting on it run and say why they cannot
        publish_job_event(connection, job_id, "end")
    elif view["status"] == "running":
        connection.set(cancel_key(job_id), 1, ex=settings.result_ttl_s)
    return job_view(connection, fetch_job(connection, job_id), settings)


@router.get("/{job_id}/overlay.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}}, 404: {"model": ErrorResponse},
                       409: {"model": ErrorResponse}, 410: {"model": ErrorResponse}})
def job_overlay(job_id: str, settings: Settings = Depends(get_settings), connection=Depends(get_redis)):
    """The image with the job's segments drawn and labelled, for people."""
    job = fetch_job(connection, job_id)
    view = job_view(connection, job, settings)
    if view["status"] != "succeeded" or "segments" not in (view["result"] or {}):
        raise ApiError(409, "not_ready", f"job {job_id} is {view['status']}; an overlay needs a succeeded "
                                         "segmentation job")
    key = job.args[0]["image"]["key"]
    try:
        image = load_image(connection, key)
    except ImageMissingError:
        raise ApiError(410, "image_expired", "the job's image has expired from the store") from None
    return Response(render_overlay(image, view["result"]["segments"]), media_type="image/png")
