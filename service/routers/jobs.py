"""GET/DELETE /jobs/{id} and the overlay picture."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from rq.exceptions import NoSuchJobError
from rq.job import Job as RQJob
from rq.serializers import JSONSerializer
from starlette.concurrency import run_in_threadpool

from attnseg.images import ImageMissingError
from attnseg.images import fetch as fetch_picture
from attnseg.ownership import owned_by
from service.deps import JobEventsDep, OverlaySlotsDep, RedisDep, SettingsDep, TenantDep
from service.errors import ApiError, error_responses
from service.job_view import job_view
from service.lifecycle import wait_unless_shutting_down
from service.overlay import render_overlay
from service.records import cancel
from service.schemas import Job, shown_id, valid_id

router = APIRouter(prefix="/jobs", tags=["jobs"])
WaitQuery = Annotated[
    float,
    Query(
        ge=0,
        le=60,
        description="Hold up to this many seconds until the job ends (a shutting-down API answers at once).",
    ),
]
ProgressQuery = Annotated[
    bool,
    Query(description="With `wait`: also answer as soon as the job's status or progress changes (for progress bars)."),
]

FINAL = ("succeeded", "failed", "canceled")
RECHECK_S = 5.0  # a waited-for job is re-read this often anyway (its worker lost, a signal missed)
POLL_S = 0.05  # ... and this often while the job-event subscription is down


def fetch_job(connection, job_id: str, tenant: str) -> RQJob:
    """The tenant's job; 404 for ids of any other shape, unknown ids and other tenants' jobs alike."""
    job = None
    if valid_id(job_id):
        try:
            job = RQJob.fetch(job_id, connection=connection, serializer=JSONSerializer)
        except NoSuchJobError:
            pass
    meta = job.get_meta(refresh=False) if job is not None else {}
    if "kind" not in meta or not owned_by(meta, tenant):
        raise ApiError(
            404,
            "not_found",
            f"no job with id '{shown_id(job_id)}' (finished jobs are kept for a limited time, see expires_at)",
            field="job_id",
        )
    return job


@router.get("/{job_id}", response_model=Job, responses=error_responses(401, 404, 422, 503))
async def get_job(
    job_id: str,
    request: Request,
    tenant: TenantDep,
    settings: SettingsDep,
    connection: RedisDep,
    job_events: JobEventsDep,
    wait: WaitQuery = 0,
    progress: ProgressQuery = False,
):
    deadline = time.monotonic() + wait
    first_seen = None
    with job_events.watch(job_id, progress=progress) as woken:
        while True:
            woken.clear()  # before the read: a signal sent after it wakes the wait below
            view = await run_in_threadpool(
                lambda: job_view(connection, fetch_job(connection, job_id, tenant), settings)
            )
            seen = (view["status"], view["progress"])
            first_seen = first_seen or seen
            if wait_is_over(view, deadline) or (progress and seen != first_seen):
                return view
            pause = RECHECK_S if job_events.listening else POLL_S
            if not await wait_unless_shutting_down(
                request.app, woken, min(pause, max(0.0, deadline - time.monotonic()))
            ):
                return view


def wait_is_over(view: dict, deadline: float) -> bool:
    """A long-poll answers when the job has ended or its wait is up."""
    return view["status"] in FINAL or time.monotonic() >= deadline


@router.delete("/{job_id}", response_model=Job, responses=error_responses(401, 404, 422, 503))
def cancel_job(
    job_id: str,
    tenant: TenantDep,
    settings: SettingsDep,
    connection: RedisDep,
):
    """Cancels a queued job at once; asks a running one to stop (the worker checks between steps)."""
    cancel(connection, fetch_job(connection, job_id, tenant), settings)
    return job_view(connection, fetch_job(connection, job_id, tenant), settings)


@router.get(
    "/{job_id}/overlay.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **error_responses(401, 404, 409, 410, 422, 429, 503)},
)
def job_overlay(
    job_id: str,
    tenant: TenantDep,
    settings: SettingsDep,
    connection: RedisDep,
    slots: OverlaySlotsDep,
):
    """The image with the job's segments drawn and labelled, for people: at most
    `ATTNSEG_OVERLAY_MAX_SIDE` pixels on its longer side (larger pictures are drawn reduced)."""
    job = fetch_job(connection, job_id, tenant)
    view = job_view(connection, job, settings)
    if view["status"] != "succeeded" or "segments" not in (view["result"] or {}):
        raise ApiError(
            409, "not_ready", f"job {job_id} is {view['status']}; an overlay needs a succeeded segmentation job"
        )
    entry = job.args[0]["image"]
    if not slots.acquire(blocking=False):
        raise ApiError(
            429,
            "overlays_busy",
            f"{settings.overlay_concurrency} overlays are being drawn already; retry shortly",
            headers={"Retry-After": "1"},
        )
    try:
        picture = fetch_picture(connection, entry["key"])
        drawing = render_overlay(
            picture, (entry["width"], entry["height"]), view["result"]["segments"], settings.overlay_max_side
        )
    except ImageMissingError:
        raise ApiError(410, "image_expired", "the job's image has expired from the store") from None
    finally:
        slots.release()
    return Response(drawing, media_type="image/png")
