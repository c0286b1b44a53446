"""Operations: liveness, readiness (Redis and ready workers) and Prometheus metrics.

With any key configured, `/metrics` needs an operator's key (`ATTNSEG_ADMIN_KEYS`; 403 for a
tenant's) and `/readyz` answers anyone else, tenants included, with the bare verdict only (worker
hosts, pids, models and every tenant's queue depths are for operators).
"""

from __future__ import annotations

import redis
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from attnseg.queue import QUEUES, get_queue
from attnseg.workers_registry import ready_workers
from service.deps import KeyStateDep, OperatorDep, RedisDep, require_operator
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
def readyz(operator: OperatorDep, key: KeyStateDep, connection: RedisDep):
    """Ready when Redis answers and at least one worker has loaded its models (200, else 503).

    With keys configured, only an operator's key gets `workers` and `queues`; others get `ready` and `redis`.
    """
    try:
        connection.ping()
        workers = ready_workers(connection)
        queues = {name: get_queue(connection, name).count for name in QUEUES}
        reachable = True
    except redis.RedisError:
        workers, queues, reachable = [], {}, False
    body = Readiness(ready=reachable and bool(workers), redis=reachable, key=key, workers=workers, queues=queues)
    content = body.model_dump(mode="json", exclude=None if operator else {"workers", "queues"})
    return JSONResponse(content, status_code=200 if body.ready else 503)


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[Depends(require_operator)],
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}, **error_responses(401, 403)},
)
def metrics(request: Request):
    """Prometheus text: HTTP requests, queue depth, ready workers, job durations."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
