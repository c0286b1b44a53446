"""The error envelope `{"error": {"code", "message", "field"?}}` and the handlers that produce it."""

from __future__ import annotations

import logging
import re

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from attnseg.wording import count

log = logging.getLogger("attnseg.api")


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, *, field: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers


def error_responses(*statuses: int) -> dict[int, dict]:
    """OpenAPI `responses` entries for the error statuses a route can answer."""
    from service.schemas import ErrorResponse

    return {status: {"model": ErrorResponse} for status in statuses}


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette's 405 names only the first route's)."""
    return [
        method
        for method in HTTP_METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL for route in request.app.router.routes
        )
    ]


def error_response(
    status: int, code: str, message: str, field: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body: dict = {"code": code, "message": message}
    if field is not None:
        body["field"] = field
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def field_path(loc: tuple) -> str:
    """pydantic's location as the user writes it: `classes[1]`, `params.epochs`. FastAPI's
    "body"/"query"/"path" prefix is dropped: users know the field, not the transport."""
    path = ""
    for part in loc:
        if part in ("body", "query", "path", "form"):
            continue
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path or "body"


# pydantic's wording for the constraints our fields use, in the user's terms (ctx names the limit).
PLAIN_MESSAGES = {
    "string_too_long": lambda ctx: f"at most {count(ctx['max_length'], 'character')}",
    "string_too_short": lambda ctx: (
        "must not be empty" if ctx["min_length"] == 1 else f"at least {count(ctx['min_length'], 'character')}"
    ),
    "too_long": lambda ctx: f"at most {count(ctx['max_length'], 'item')}",
    "too_short": lambda ctx: f"at least {count(ctx['min_length'], 'item')}",
    "missing": lambda ctx: "required",
    "extra_forbidden": lambda ctx: "unknown field (a typo must not fall back to a default)",
}


NAMED = re.compile(r"([A-Za-z_][\w.\[\]]*): ")  # a message of our own validators: "classes: ..."


def located(error: dict) -> tuple[str, str]:
    """One pydantic error as (field, `field: message`), in plain words where pydantic's are its own,
    without pydantic's "Value error, " prefix and without naming the field twice. A whole-model
    check has no location: the field is the one its message starts with."""
    field = field_path(tuple(error.get("loc", ())))
    plain = PLAIN_MESSAGES.get(error.get("type", ""))
    message = plain(error.get("ctx", {})) if plain is not None else error.get("msg", "invalid")
    message = message.removeprefix("Value error, ")
    named = NAMED.match(message)
    if field == "body" and named:
        return named.group(1), message
    return field, message if message.startswith(f"{field}:") else f"{field}: {message}"


def validation_message(errors: list[dict]) -> tuple[str, str]:
    """The first error's field, and every error's text (up to 5), so each bad entry is named."""
    shown = [located(error) for error in errors[:5]]
    return shown[0][0], "; ".join(text for _, text in shown)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        field, message = validation_message(list(exc.errors()))
        return error_response(422, "invalid_field", message, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}
        headers = dict(getattr(exc, "headers", None) or {})
        message = str(exc.detail)
        if exc.status_code == 405:
            allowed = allowed_methods(request)
            headers["Allow"] = ", ".join(allowed)
            message = f"{request.method} is not allowed here; allowed: {', '.join(allowed)}"
        return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), message, headers=headers)

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def _redis_down(_: Request, exc: Exception):
        log.warning("redis unavailable: %s", exc)
        return error_response(
            503, "unavailable", "the job store (Redis) is unavailable; retry shortly", headers={"Retry-After": "5"}
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        from service.edges import SECURITY_HEADERS  # this answer bypasses the middleware stack

        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(
            500, "internal_error", "internal error; this is a bug, please report it", headers=SECURITY_HEADERS
        )
