"""The worker process: load the models once, warm up, announce readiness, then serve the queues.

RQ's SimpleWorker runs each job in this process (the forking worker would reload the models for
every job and cannot share a CUDA context). A pulse thread keeps three things fresh while the
main thread works: the readiness announcement, the running job's registry entry (so a dead worker's
job is failed within `worker_lost_after_s`), and the cleanup of jobs abandoned by other workers.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone

import numpy as np
import redis
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker, WorkerStatus

from attnseg.queue import QUEUES, clean_canceled, connect, get_queue
from attnseg.settings import Settings
from attnseg.workers_registry import announce, withdraw
from workers.engine import runtime as runtime_module
from workers.methods.concepts import concept_shapes
from workers.methods.unsupervised import segment_unsupervised

log = logging.getLogger("attnseg.worker")


class ModelWorker(SimpleWorker):
    """A SimpleWorker whose running job's liveness entry expires `lost_after_s` after its last beat."""

    lost_after_s = 60

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.lost_after_s

    def execute_job(self, job: Job, queue):
        execution = self.prepare_execution(job)
        self.running = (job, execution)
        try:
            self.perform_job(job, queue, execution)
        finally:
            self.running = None
        self.set_state(WorkerStatus.IDLE)

    running: tuple | None = None


class Pulse(threading.Thread):
    def __init__(self, worker: ModelWorker, info: dict, settings: Settings):
        super().__init__(name="attnseg-pulse", daemon=True)
        self.worker, self.info, self.settings = worker, info, settings
        self.stopped = threading.Event()

    def beat(self) -> None:
        connection = self.worker.connection
        state = "busy" if self.worker.running else "idle"
        announce(connection, {**self.info, "state": state}, ttl_s=3 * self.settings.worker_heartbeat_s)
        running = self.worker.running
        if running is not None:
            self.worker.maintain_heartbeats(*running)
        for name in QUEUES:
            StartedJobRegistry(name, connection=connection, serializer=JSONSerializer).cleanup()
            clean_canceled(connection, name)

    def run(self) -> None:
        while not self.stopped.wait(self.settings.worker_heartbeat_s):
            try:
                self.beat()
            except redis.RedisError as exc:  # Redis restarting: keep beating, RQ reconnects too
                log.warning("pulse: redis unavailable: %s", exc)


def warm_up(runtime: runtime_module.Runtime) -> float:
    """One real pass so the first user job does not pay for lazy initialisation."""
    started = time.perf_counter()
    image = np.full((64, 64, 3), 127, dtype=np.uint8)
    segment_unsupervised(runtime.sd, image)  # the default resolution: the shapes most jobs will use
    return time.perf_counter() - started


def default_worker_name() -> str:
    """Unique per process start: a restart (same host, and under Docker the same pid 1) never collides
    with the registration RQ keeps for a crashed predecessor until its heartbeat lapses."""
    return f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(3)}"


def run_worker(settings: Settings, *, queues: tuple[str, ...] = QUEUES, name: str | None = None,
               burst: bool = False) -> None:
    runtime = runtime_module.load_runtime(settings)
    runtime_module.install(runtime)
    if settings.warmup:
        log.info("warm-up pass took %.1f s", warm_up(runtime))

    connection = connect(settings.redis_url)
    name = name or default_worker_name()
    ModelWorker.lost_after_s = settings.worker_lost_after_s
    worker = ModelWorker([get_queue(connection, q) for q in queues], connection=connection, name=name,
                         serializer=JSONSerializer)
    info = {"name": name, "host": socket.gethostname(), "pid": os.getpid(), "queues": list(queues),
            "ready_at": datetime.now(timezone.utc).isoformat(), **runtime.describe(),
            "concept_shapes": concept_shapes(runtime.sd)}  # the API checks concept uploads against them
    pulse = Pulse(worker, info, settings)
    pulse.beat()
    pulse.start()
    log.info("worker %s ready: %s", name, runtime.describe())
    try:
        worker.work(burst=burst, with_scheduler=False)
    finally:
        pulse.stopped.set()
        try:
            withdraw(connection, name)
        except redis.RedisError:
            pass
