"""Operations: liveness, readiness (Redis and ready workers) and Prometheus metrics.

With API keys configured, `/metrics` needs a key and `/readyz` answers a probe without one with
the bare verdict only (worker hosts, pids and models are for key holders).
"""

from __future__ import annotations

import redis
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from attnseg.queue import QUEUES, get_queue
from attnseg.workers_registry import ready_workers
from service.deps import OptionalTenantDep, RedisDep, current_tenant
from service.errors import error_responses
from service.schemas import Readiness

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz():
    """The process is up (no dependency is checked)."""
    return {"status": "ok"}


@router.get(
    "/readyz", response_model=Readiness, responses={503: {"model": Readiness}}, openapi_extra={"security": [{}]}
)  # added to the bearer scheme: a key is optional here
def readyz(tenant: OptionalTenantDep, connection: RedisDep):
    """Ready when Redis answers and at least one worker has loaded its models (200, else 503).

    Without a valid key (when keys are configured) only `ready` and `redis` are given.
    """
    try:
        connection.ping()
        workers = ready_workers(connection)
        queues = {name: get_queue(connection, name).count for name in QUEUES}
        reachable = True
    except redis.RedisError:
        workers, queues, reachable = [], {}, False
    body = Readiness(ready=reachable and bool(workers), redis=reachable, workers=workers, queues=queues)
    content = body.model_dump(mode="json", exclude=None if tenant else {"workers", "queues"})
    return JSONResponse(content, status_code=200 if body.ready else 503)


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[Depends(current_tenant)],
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}, **error_responses(401)},
)
def metrics(request: Request):
    """Prometheus text: HTTP requests, queue depth, ready workers, job durations."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
