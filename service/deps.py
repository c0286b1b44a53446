"""FastAPI dependencies: settings, the Redis connection, and the caller's tenant.

`current_tenant` is the one place a request's API key becomes a tenant: every route that creates
or reads owned things (jobs, one-shot models, concepts) depends on it (attnseg.ownership stamps and
checks the owner).
"""

from __future__ import annotations

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from attnseg.ownership import DEFAULT_TENANT
from attnseg.settings import Settings
from service.auth import KeyRing
from service.errors import ApiError

bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_redis(request: Request):
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


def current_tenant(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
    """FastAPI dependency: the tenant owning what this request creates and sees; 401 without a valid key."""
    tenant = tenant_from(request, credentials)
    if tenant is None:
        raise unauthorized()
    return tenant


def optional_tenant(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str | None:
    """Like current_tenant, but None instead of 401 (for answers that have a public, reduced form)."""
    return tenant_from(request, credentials)


def get_job_events(request: Request):
    return request.app.state.job_events


def get_overlay_slots(request: Request):
    """The overlays this process may draw at once (ATTNSEG_OVERLAY_CONCURRENCY): a BoundedSemaphore."""
    return request.app.state.overlay_slots
