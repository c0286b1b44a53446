"""The FastAPI application: routers per resource, the /ui playground, error envelope, body cap, metrics."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from attnseg.queue import connect
from attnseg.settings import Settings, get_settings
from service.errors import install_error_handlers
from service.limits import BodySizeLimitMiddleware
from service.metrics import Metrics, MetricsMiddleware
from service.routers import jobs, oneshot, ops, segment
from service.routers.ui import mount_ui

DESCRIPTION = """Segmentation on Stable Diffusion attention maps.

Every model call is an asynchronous job: `POST` answers **202** with a job and a `Location`
header; poll `GET /jobs/{id}` (optionally `?wait=N`). Masks come back as COCO compressed RLE in
the original image's pixel grid. Errors are `{"error": {"code", "message", "field"?}}`.
"""


def create_app(settings: Settings | None = None, connection=None) -> FastAPI:
    settings = settings or get_settings()
    connection = connection if connection is not None else connect(settings.redis_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        connection.close()

    app = FastAPI(title="attnseg", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.redis = connection
    app.state.metrics = Metrics(connection)
    install_error_handlers(app)
    for router in (segment.router, oneshot.router, jobs.router, ops.router):
        app.include_router(router)
    mount_ui(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    logging.getLogger("attnseg").setLevel(logging.INFO)
    return app
