"""Typed errors: one `ApiError` subclass per HTTP status family, and `JobFailed` for jobs that end badly.

Every error carries the API's envelope `{"error": {"code", "message", "field"?}}` as attributes, so
callers can branch on `code` and point a user at `field`.
"""

from __future__ import annotations

from typing import Any


class AttnsegError(Exception):
    """Base of everything the client raises on purpose (transport errors stay httpx's)."""


class ApiError(AttnsegError):
    """The API answered with an error status."""

    def __init__(
        self, status: int, code: str, message: str, field: str | None = None, retry_after: float | None = None
    ):
        where = f" (field: {field})" if field else ""
        super().__init__(f"{status} {code}: {message}{where}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after


class InvalidRequest(ApiError):
    """400 or 422: a field is missing, unknown, out of range, or the body is malformed (`field` names it)."""


class PayloadTooLarge(InvalidRequest):
    """413: the body or the image's pixel count is over the server's limit (the message says which)."""


class UnsupportedMediaType(InvalidRequest):
    """415: not a JPEG, PNG or WebP, or a body that is neither multipart nor JSON."""


class Unauthorized(ApiError):
    """401: the API wants `Authorization: Bearer <key>` (pass `api_key=`)."""


class Forbidden(ApiError):
    """403: the key is valid but may not do this."""


class NotFound(ApiError):
    """404: unknown (or expired, or another tenant's) job or model id."""


class Conflict(ApiError):
    """409: e.g. the overlay of a job that has not succeeded, or a model whose training failed."""


class Gone(ApiError):
    """410: the job's image has expired from the store."""


class QueueFull(ApiError):
    """429: the queue is full; raised once the client's bounded retries (honouring Retry-After) ran out."""


class Unavailable(ApiError):
    """503: the service cannot reach its job store; raised once the bounded retries ran out."""


class ServerError(ApiError):
    """Any other 5xx: a defect in the service; worth a bug report."""


ERRORS_BY_STATUS: dict[int, type[ApiError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    410: Gone,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: InvalidRequest,
    429: QueueFull,
    503: Unavailable,
}


def error_class(status: int) -> type[ApiError]:
    return ERRORS_BY_STATUS.get(status, ServerError if status >= 500 else ApiError)


class JobFailed(AttnsegError):
    """The job ended `failed`: `code` and `message` are the job's `error` (e.g. `timeout`, `worker_lost`)."""

    def __init__(self, job_id: str, code: str, message: str, field: str | None = None, job: Any = None):
        super().__init__(f"job {job_id} {self.ending}: {code}: {message}")
        self.job_id = job_id
        self.code = code
        self.message = message
        self.field = field
        self.job = job  # the job's final state (JobState)

    ending = "failed"


class JobCanceled(JobFailed):
    """The job was canceled (`DELETE /jobs/{id}`, or its one-shot model was deleted)."""

    ending = "was canceled"


class WaitTimeout(AttnsegError, TimeoutError):
    """`wait(timeout=...)` passed before the job ended; the job keeps running on the server."""
