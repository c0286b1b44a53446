"""FastAPI dependencies: settings, the Redis connection, authentication."""

from __future__ import annotations

import secrets

from fastapi import Depends, Request

from attnseg.settings import Settings
from service.errors import ApiError


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_redis(request: Request):
    return request.app.state.redis


def get_job_events(request: Request):
    return request.app.state.job_events


def require_api_key(request: Request, settings: Settings = Depends(get_settings)) -> None:
    """With ATTNSEG_API_KEY set, every model and job route needs `Authorization: Bearer <key>`."""
    if settings.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), settings.api_key.encode()):
        raise ApiError(401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>'",
                       headers={"WWW-Authenticate": "Bearer"})
