"""The FastAPI application: routers per resource, the /ui playground, error envelope, body cap, metrics."""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI

from attnseg import oneshot_store
from attnseg.queue import connect
from attnseg.settings import Settings, get_settings
from service.auth import KeyRing
from service.edges import install_edges
from service.errors import install_error_handlers
from service.job_events import JobEvents
from service.lifecycle import begin_shutdown, open_lifecycle
from service.limits import BodySizeLimitMiddleware
from service.metrics import Metrics, MetricsMiddleware
from service.routers import concepts, jobs, oneshot, ops, segment
from service.routers.docs import mount_docs
from service.routers.ui import mount_ui
from service.url_secrets import UrlSecretsMiddleware, scrub_access_log

log = logging.getLogger("attnseg.api")

DESCRIPTION = """Segmentation on Stable Diffusion attention maps.

Every model call is an asynchronous job: `POST` answers **202** with a job and a `Location`
header; poll `GET /jobs/{id}` (optionally `?wait=N`). Masks come back as COCO compressed RLE in
the original image's pixel grid. Errors are `{"error": {"code", "message", "field"?}}`.
With API keys configured, every model and job route needs `Authorization: Bearer <key>`; jobs and
models belong to the key's tenant (others get 404).
"""


def create_app(settings: Settings | None = None, connection=None) -> FastAPI:
    settings = settings or get_settings()
    connection = connection if connection is not None else connect(settings.redis_url)

    job_events = JobEvents(settings.redis_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        open_lifecycle(app)
        job_events.start()
        try:
            adopted = oneshot_store.adopt_untenanted(connection)
            if adopted:
                log.info("one-shot models from before tenants: %d moved to tenant 'default'", adopted)
        except redis.RedisError as exc:  # Redis not up yet: the next start adopts them
            log.warning("one-shot models from before tenants not adopted yet: %s", exc)
        yield
        begin_shutdown(app)  # long-polls answer first
        await job_events.stop()
        connection.close()

    # FastAPI's own /docs and /redoc load their scripts from a CDN: ours are served from the package.
    app = FastAPI(
        title="attnseg", version="0.1.0", description=DESCRIPTION, lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.settings = settings
    app.state.redis = connection
    app.state.job_events = job_events
    app.state.overlay_slots = threading.BoundedSemaphore(settings.overlay_concurrency)
    app.state.metrics = Metrics(connection)
    app.state.keyring = KeyRing(settings)
    install_error_handlers(app)
    for router in (segment.router, oneshot.router, concepts.router, jobs.router, ops.router):
        app.include_router(router)
    mount_docs(app)
    mount_ui(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(UrlSecretsMiddleware)
    install_edges(app, settings.cors_origins)
    scrub_access_log()
    logging.getLogger("attnseg").setLevel(logging.INFO)
    return app
