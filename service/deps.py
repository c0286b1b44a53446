"""FastAPI dependencies: settings, the Redis connection, the job-event listener and the caller's
tenant, each with a typed alias (`SettingsDep`, `RedisDep`, ...) that every router uses.

`current_tenant` is the one place a request's API key becomes a tenant: every route that creates
or reads owned things (jobs, one-shot models, concepts) depends on it (attnseg.ownership stamps and
checks the owner).
"""

from __future__ import annotations

import threading
from typing import Annotated

import redis
from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import Field

from attnseg.ownership import DEFAULT_TENANT
from attnseg.settings import Settings
from service.auth import KeyRing
from service.errors import ApiError
from service.job_events import JobEvents
from service.schemas import DIGITS_ONLY, MAX_OFFSET

# The dependencies every job request solves are `async def`: FastAPI runs a plain `def` dependency
# in the thread pool, a thread hop each (about 0.1 ms of CPU apiece, several per request), and
# these only read app state (current_tenant: a key comparison, at most a stat of the keys file).

bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")


BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_redis(request: Request) -> redis.Redis:
    return request.app.state.redis


def unauthorized() -> ApiError:
    return ApiError(
        401,
        "unauthorized",
        "missing or wrong API key: send 'Authorization: Bearer <key>'",
        headers={"WWW-Authenticate": "Bearer"},
    )


def tenant_from(request: Request, credentials: HTTPAuthorizationCredentials | None) -> str | None:
    """The caller's tenant; None when keys are configured and the request has no valid one."""
    keyring: KeyRing = request.app.state.keyring
    if not keyring.enabled:
        return DEFAULT_TENANT
    if credentials is None or credentials.scheme.lower() != "bearer":
        return None
    return keyring.tenant_of(credentials.credentials)


async def current_tenant(request: Request, credentials: BearerDep) -> str:
    """FastAPI dependency: the tenant owning what this request creates and sees; 401 without a valid key."""
    tenant = tenant_from(request, credentials)
    if tenant is None:
        raise unauthorized()
    return tenant


def is_operator(request: Request, credentials: BearerDep) -> bool:
    """FastAPI dependency: whether the caller may see operations details (everyone while no key is
    configured; then only holders of an `ATTNSEG_ADMIN_KEYS` key, never a tenant's key)."""
    keyring: KeyRing = request.app.state.keyring
    if not keyring.operators_only:
        return True
    bearer_token = credentials is not None and credentials.scheme.lower() == "bearer"
    return bearer_token and keyring.is_admin(credentials.credentials)


def require_operator(request: Request, credentials: BearerDep) -> None:
    """FastAPI dependency: 401 without a valid key, 403 for a tenant's key, unless is_operator."""
    if is_operator(request, credentials):
        return
    if credentials is not None and request.app.state.keyring.enabled and tenant_from(request, credentials):
        raise ApiError(
            403,
            "forbidden",
            "this is an operator endpoint: tenants' keys do not open it (operators' keys are ATTNSEG_ADMIN_KEYS)",
        )
    raise unauthorized()


def key_state(request: Request, credentials: BearerDep) -> str:
    """What this request's key is worth: `not_needed` (no keys configured), `missing`, `refused` or
    `accepted` (a tenant's or an operator's key). Said by /readyz so that a page can tell a key
    problem from a service one."""
    keyring: KeyRing = request.app.state.keyring
    if not keyring.enabled:
        return "not_needed"
    if credentials is None:
        return "missing"
    accepted = tenant_from(request, credentials) is not None or is_operator(request, credentials)
    return "accepted" if accepted else "refused"


async def get_job_events(request: Request) -> JobEvents:
    return request.app.state.job_events


def get_overlay_slots(request: Request):
    """The overlays this process may draw at once (ATTNSEG_OVERLAY_CONCURRENCY): a BoundedSemaphore."""
    return request.app.state.overlay_slots


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]
JobEventsDep = Annotated[JobEvents, Depends(get_job_events)]
TenantDep = Annotated[str, Depends(current_tenant)]
OperatorDep = Annotated[bool, Depends(is_operator)]
KeyStateDep = Annotated[str, Depends(key_state)]
OverlaySlotsDep = Annotated[threading.BoundedSemaphore, Depends(get_overlay_slots)]

# A page of a listing (newest first): its defaults are written where the route declares them.
# Digits only: pydantic alone would read "+0.0" or "1_0" as integers, which the contract does not.
OffsetQuery = Annotated[int, Query(), Field(ge=0, le=MAX_OFFSET), DIGITS_ONLY]
LimitQuery = Annotated[int, Query(), Field(ge=1, le=500), DIGITS_ONLY]
