"""Turning a validated request into a queued job: store the images, enqueue, answer 202."""

from __future__ import annotations

from typing import Callable

from fastapi import Response
from PIL import Image

from attnseg.images import store_image
from attnseg.queue import QueueFullError, enqueue
from attnseg.settings import Settings
from service.errors import ApiError
from service.job_view import job_view


def image_entry(connection, image: Image.Image, settings: Settings) -> dict:
    return {"key": store_image(connection, image, settings.image_ttl_s),
            "width": image.width, "height": image.height}


def submit_job(connection, settings: Settings, response: Response, kind: str, payload: dict,
               **enqueue_options) -> dict:
    try:
        job = enqueue(connection, settings, kind, payload, **enqueue_options)
    except QueueFullError as exc:
        raise ApiError(429, "queue_full", f"the {exc.queue} queue is full ({exc.depth} jobs); retry later",
                       headers={"Retry-After": "30"}) from None
    response.headers["Location"] = f"/jobs/{job.id}"
    return job_view(connection, job, settings)


def submit_or_undo(connection, settings: Settings, response: Response, kind: str, payload: dict,
                   undo: Callable[[], object], **enqueue_options) -> dict:
    """submit_job for a job that makes a stored record; undo() (deleting that record) when refused."""
    try:
        return submit_job(connection, settings, response, kind, payload, **enqueue_options)
    except ApiError:
        undo()
        raise
