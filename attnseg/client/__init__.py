"""A typed Python client for the attnseg API (sync `Client`, asyncio `AsyncClient`); no torch.

from attnseg.client import Client

with Client("http://127.0.0.1:8000") as client:
    result = client.segment_text("park.jpg", ["dog", "grass"]).result()
    for segment in result.segments:
        print(segment.label, segment.score, segment.mask.sum())
"""

from attnseg.client.aio import AsyncClient, AsyncConcept, AsyncJob, AsyncOneshotModel
from attnseg.client.errors import (
    ApiError,
    AttnsegError,
    Conflict,
    Forbidden,
    Gone,
    InvalidRequest,
    JobCanceled,
    JobFailed,
    NotFound,
    PayloadTooLarge,
    QueueFull,
    ServerError,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
    WaitTimeout,
)
from attnseg.client.inputs import ImageInput, PictureInput, StoredPicture
from attnseg.client.results import ConceptState, JobState, ModelState, Progress, Result, Segment
from attnseg.client.sync import Client, Concept, Job, OneshotModel

__all__ = [
    "AsyncClient",
    "AsyncJob",
    "AsyncOneshotModel",
    "AsyncConcept",
    "Client",
    "Job",
    "OneshotModel",
    "Concept",
    "Result",
    "Segment",
    "Progress",
    "JobState",
    "ModelState",
    "ConceptState",
    "ImageInput",
    "PictureInput",
    "StoredPicture",
    "AttnsegError",
    "ApiError",
    "InvalidRequest",
    "PayloadTooLarge",
    "UnsupportedMediaType",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "Conflict",
    "Gone",
    "QueueFull",
    "Unavailable",
    "ServerError",
    "JobFailed",
    "JobCanceled",
    "WaitTimeout",
]
