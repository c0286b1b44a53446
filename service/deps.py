"""FastAPI dependencies: settings and the Redis connection (the caller's tenant: service.auth)."""

from __future__ import annotations

from fastapi import Request

from attnseg.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_redis(request: Request):
    return request.app.state.redis
