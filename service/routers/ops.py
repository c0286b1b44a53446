"""Operations: liveness, readiness (Redis and ready workers) and Prometheus metrics."""

from __future__ import annotations

import redis
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from attnseg.queue import QUEUES, get_queue
from attnseg.workers_registry import ready_workers
from service.deps import get_redis
from service.schemas import Readiness

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz():
    """The process is up (no dependency is checked)."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
def readyz(connection=Depends(get_redis)):
    """Ready when Redis answers and at least one worker has loaded its models."""
    try:
        connection.ping()
        workers = ready_workers(connection)
        queues = {name: get_queue(connection, name).count for name in QUEUES}
        reachable = True
    except redis.RedisError:
        workers, queues, reachable = [], {}, False
    body = Readiness(ready=reachable and bool(workers), redis=reachable, workers=workers, queues=queues)
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if body.ready else 503)


@router.get("/metrics", response_class=Response)
def metrics(request: Request):
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
