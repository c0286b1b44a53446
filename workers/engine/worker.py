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
from datetime import datetime, timezone

import numpy as np
import redis
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException
from rq.utils import now
from rq.worker import SimpleWorker, WorkerStatus

from attnseg.queue import QUEUES, clean_canceled, connect, get_queue, publish_job_event
from attnseg.settings import Settings
from attnseg.workers_registry import announce, withdraw
from workers.engine import runtime as runtime_module
from workers.engine.batch import Batch, Member, claim_companions, fail_live, settle
from workers.engine.context import JobContext
from workers.engine.jobs import BATCHES
from workers.methods.concepts import concept_shapes
from workers.methods.unsupervised import segment_unsupervised

log = logging.getLogger("attnseg.worker")

HEARTBEAT_MIN_S = 2.0


class ModelWorker(SimpleWorker):
    """A SimpleWorker whose running job's liveness entry expires `lost_after_s` after its last beat,
    and which runs queued jobs that can share a model pass as one batch (up to `max_batch`)."""

    lost_after_s = 60
    max_batch = 1
    running: list[tuple[Job, object]] = []  # (job, execution) pairs being worked on

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.lost_after_s

    def heartbeat(self, timeout: int | None = None, pipeline=None):
        """RQ refreshes the worker's own key (3 commands) several times around every job; its TTL is
        minutes, so a refresh within HEARTBEAT_MIN_S of the last is skipped. Calls inside a pipeline
        (RQ reads their replies by position) and with an explicit TTL always go out."""
        recent = self.last_heartbeat is not None and (now() - self.last_heartbeat).total_seconds() < HEARTBEAT_MIN_S
        if pipeline is None and timeout is None and recent:
            return
        super().heartbeat(timeout, pipeline)

    def execute_job(self, job: Job, queue):
        batch = BATCHES.get(job.func_name) if self.max_batch > 1 else None
        companions = claim_companions(self.connection, queue, job, batch, self.max_batch - 1) if batch else []
        if companions:
            self.perform_batch([job, *companions], queue, batch)
        else:
            execution = self.prepare_execution(job)
            self.running = [(job, execution)]
            try:
                self.perform_job(job, queue, execution)
            finally:
                self.running = []
                announce_end(self.connection, job.id)
        self.set_state(WorkerStatus.IDLE)

    def perform_batch(self, jobs: list[Job], queue, batch: Batch) -> None:
        """RQ's perform_job for jobs sharing one pass: each is started, finished or failed in RQ as
        if it ran alone (registries, heartbeats, results, TTLs); one timeout, the shortest, covers the
        shared work."""
        executions = {job.id: self.prepare_execution(job) for job in jobs}
        self.running = [(job, executions[job.id]) for job in jobs]
        members = []
        for job in jobs:
            self.prepare_job_execution(job, remove_from_intermediate_queue=len(self.queues) == 1)
            job.started_at = now()
            members.append(Member(job, JobContext(job), job.args[0]))
        log.info("batch of %d %s jobs: %s", len(jobs), batch.kind, ", ".join(job.id for job in jobs))

        def done(member: Member) -> None:
            if member.done:
                return
            member.done = True
            job, execution = member.job, executions[member.job.id]
            exc_info = settle(member, batch)
            if exc_info is None:
                self._finalize_success(job, queue, execution, member.result)
            else:
                self._finalize_failure(job, queue, execution, exc_info)
            self.running = [pair for pair in self.running if pair[0] is not job]
            announce_end(self.connection, job.id)

        timeout = min(job.timeout or self.queue_class.DEFAULT_TIMEOUT for job in jobs)
        try:
            with self.death_penalty_class(timeout, JobTimeoutException, job_id=jobs[0].id):
                batch.run(members, done)
        except JobTimeoutException as exc:
            fail_live(members, exc)
        finally:
            for member in members:  # those that failed before their result
                done(member)
            self.running = []


def announce_end(connection, job_id: str) -> None:
    """Wake the requests waiting on the job: RQ has stored its outcome by now."""
    try:
        publish_job_event(connection, job_id, "end")
    except redis.RedisError as exc:  # waiters re-read the job on their own within seconds
        log.warning("could not announce the end of job %s: %s", job_id, exc)


class Pulse(threading.Thread):
    def __init__(self, worker: ModelWorker, info: dict, settings: Settings):
        super().__init__(name="attnseg-pulse", daemon=True)
        self.worker, self.info, self.settings = worker, info, settings
        self.stopped = threading.Event()

    def beat(self) -> None:
        connection = self.worker.connection
        running = list(self.worker.running)
        state = "busy" if running else "idle"
        announce(connection, {**self.info, "state": state}, ttl_s=3 * self.settings.worker_heartbeat_s)
        for job, execution in running:
            self.worker.maintain_heartbeats(job, execution)
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
    ModelWorker.max_batch = settings.max_batch or (8 if runtime.sd.device.type == "cuda" else 1)
    worker = ModelWorker([get_queue(connection, q) for q in queues], connection=connection, name=name,
                         serializer=JSONSerializer)
    info = {"name": name, "host": socket.gethostname(), "pid": os.getpid(), "queues": list(queues),
            "ready_at": datetime.now(timezone.utc).isoformat(), **runtime.describe(),
            "concept_shapes": concept_shapes(runtime.sd)}  # the API checks concept uploads against them
    pulse = Pulse(worker, info, settings)
    pulse.beat()
    pulse.start()
    log.info("worker %s ready (batches of up to %d jobs): %s", name, ModelWorker.max_batch, runtime.describe())
    try:
        worker.work(burst=burst, with_scheduler=False)
    finally:
        pulse.stopped.set()
        try:
            withdraw(connection, name)
        except redis.RedisError:
            pass
