"""The worker process: load the models once, warm up, announce readiness, then serve the queues.

RQ's SimpleWorker runs each job in this process (the forking worker would reload the models for
every job and cannot share a CUDA context). The main thread keeps the model busy; three threads
work around it:
- the pulse keeps the readiness announcement fresh, the running jobs' registry entries (so a dead
  worker's jobs are failed within `worker_lost_after_s`) and cleans up jobs abandoned by others;
- the prefetcher (`pictures.Prefetcher`) decodes the pictures of the jobs waiting next;
- the finisher encodes each batchable job's masks and stores its outcome, while the main thread
  is already on the next job.
"""

from __future__ import annotations

import logging
import os
import queue as queues_module
import secrets
import socket
import threading
import time
from collections.abc import Callable
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
from workers.engine.batch import Batch, Member, attempt, claim_companions, fail_live, settle, share_key_of
from workers.engine.context import REDIS_DOWN, JobCanceled, JobContext
from workers.engine.dispatch import batch_of, handlings, picture_side, queues_with_pictures
from workers.engine.latent_cache import cached_or_fetched
from workers.engine.namesake import free_the_name
from workers.engine.pictures import Prefetcher, fetch_image, install_prefetcher
from workers.methods.unsupervised import segment_unsupervised
from workers.models.concept import concept_shapes

log = logging.getLogger("attnseg.worker")

HEARTBEAT_MIN_S = 2.0
RECONNECT_FIRST_S, RECONNECT_MAX_S = 0.5, 5.0  # waiting for Redis: first pause, longest pause


class Finisher(threading.Thread):
    """Runs the tasks it is given in order, on a thread of its own. At most `depth` wait: `submit`
    blocks beyond that, which bounds the finished-but-unsaved outputs (label maps) held in memory."""

    def __init__(self, depth: int):
        super().__init__(name="attnseg-finish", daemon=True)
        self.tasks: queues_module.Queue[Callable[[], None] | None] = queues_module.Queue(maxsize=depth)

    def submit(self, task: Callable[[], None]) -> None:
        self.tasks.put(task)

    def stop(self) -> None:
        """Run every task given so far, then end the thread."""
        self.tasks.put(None)
        self.join()

    def run(self) -> None:
        while True:
            task = self.tasks.get()
            if task is None:
                return
            try:
                task()
            except Exception:
                log.exception("finishing a job failed")


class ModelWorker(SimpleWorker):
    """A SimpleWorker whose running job's liveness entry expires `lost_after_s` after its last beat,
    which runs queued jobs that can share a model pass as one batch (up to `max_batch`), and which
    decodes the next pictures and saves the last outcomes while the model works (`prefetch_bytes`:
    the most decoded pixels held ahead, 0 for none)."""

    lost_after_s = 60
    max_batch = 1
    prefetch_bytes = 256 * 2**20

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._running: dict[str, tuple[Job, object]] = {}  # job id -> (job, execution) not yet finalised
        self._running_lock = threading.Lock()
        self.model_busy_s = 0.0  # seconds the main thread spent running jobs: the model's busy time
        self.on_state_change: Callable[[], None] | None = None  # called when it turns busy or idle
        self.finisher: Finisher | None = None
        self.prefetcher: Prefetcher | None = None

    def running(self) -> list[tuple[Job, object]]:
        with self._running_lock:
            return list(self._running.values())

    def _track(self, job: Job, execution) -> None:
        with self._running_lock:
            turned_busy = not self._running
            self._running[job.id] = (job, execution)
        if turned_busy:
            self._state_changed()

    def _untrack(self, job: Job) -> None:
        with self._running_lock:
            turned_idle = self._running.pop(job.id, None) is not None and not self._running
        if turned_idle:
            self._state_changed()

    def _state_changed(self) -> None:
        if self.on_state_change is None:
            return
        try:
            self.on_state_change()
        except redis.RedisError as exc:  # the next pulse says it anyway
            log.warning("could not announce the worker's state: %s", exc)

    def handle_exception(self, job: Job, *exc_info):
        """A cancel is the user's request, not an error: one INFO line instead of RQ's ERROR and traceback."""
        if exc_info[0] is not None and issubclass(exc_info[0], JobCanceled):
            log.info("job %s canceled by request", job.id)
            return
        super().handle_exception(job, *exc_info)

    def bootstrap(self, *args, **kwargs):
        super().bootstrap(*args, **kwargs)
        handlings()  # every job kind's code imported now: a wrong path in attnseg.queue.KINDS stops the start
        self.finisher = Finisher(depth=max(1, self.max_batch))
        self.finisher.start()
        with_pictures = queues_with_pictures()
        if self.prefetch_bytes:
            self.prefetcher = Prefetcher(
                self.connection,
                [q.key for q in self.queues if q.name in with_pictures],
                picture_side,
                depth=max(1, self.max_batch),
                max_bytes=self.prefetch_bytes,
            )
            self.prefetcher.start()
            install_prefetcher(self.prefetcher)

    def teardown(self):
        """Before RQ withdraws the worker: the outcomes still being saved are saved."""
        if self.finisher is not None:
            self.finisher.stop()
        if self.prefetcher is not None:
            install_prefetcher(None)
            self.prefetcher.stop()
        super().teardown()

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.lost_after_s

    def heartbeat(self, timeout: int | None = None, pipeline=None):
        """RQ refreshes the worker's own key (3 commands) several times around every job; its TTL is
        minutes, so a refresh within HEARTBEAT_MIN_S of the last is skipped. Calls inside a pipeline
        (RQ reads their replies by position) and with an explicit TTL always go out."""
        recent = self.last_heartbeat is not None and (now() - self.last_heartbeat).total_seconds() < HEARTBEAT_MIN_S
        if pipeline is None and timeout is None and recent:
            return
        if pipeline is not None:
            super().heartbeat(timeout, pipeline)
            return
        try:
            super().heartbeat(timeout)
        except REDIS_DOWN as exc:  # the work loop's own heartbeat: the next one gets through
            log.warning("heartbeat: redis unreachable: %s", exc)

    def activity(self) -> dict:
        """For the announcement: the model thread's busy seconds so far (their rate between two
        announcements is its utilisation) and how often a job's picture was already decoded."""
        prefetcher = self.prefetcher
        return {
            "model_busy_s": round(self.model_busy_s, 3),
            "announced_at": datetime.now(timezone.utc).isoformat(),
            "prefetch_hits": prefetcher.hits if prefetcher else 0,
            "prefetch_misses": prefetcher.misses if prefetcher else 0,
        }

    # A Redis outage of any length is waited out: RQ's work loop quits on any error outside its
    # dequeue, so each step of it that talks to Redis waits for Redis to come back instead.

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        while True:
            try:
                return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
            except REDIS_DOWN as exc:  # RQ retries its dequeue, not the state and heartbeat around it
                wait_for_redis(self.connection, exc)

    def check_for_suspension(self, burst: bool) -> None:
        try:
            super().check_for_suspension(burst)
        except REDIS_DOWN as exc:
            wait_for_redis(self.connection, exc)

    def run_maintenance_tasks(self) -> None:
        try:
            super().run_maintenance_tasks()
        except REDIS_DOWN as exc:  # the next round does them
            wait_for_redis(self.connection, exc)

    def execute_job(self, job: Job, queue):
        """A job (or batch) that loses Redis ends where it got to: an outcome RQ could not store leaves
        the job started without heartbeats, so it is failed as worker_lost once Redis is back."""
        try:
            self.run_job_or_batch(job, queue)
            self.set_state(WorkerStatus.IDLE)
        except REDIS_DOWN as exc:
            log.warning("job %s lost redis while it ran", job.id)
            wait_for_redis(self.connection, exc)

    def run_job_or_batch(self, job: Job, queue) -> None:
        batch = batch_of(job.func_name)
        key = share_key_of(job, batch) if batch is not None else None
        if key is not None:
            companions = claim_companions(self.connection, queue, key, batch, self.max_batch - 1)
            self.perform_batch([job, *companions], queue, batch)
            return
        self.look_ahead()
        execution = self.prepare_execution(job)
        self._track(job, execution)
        started = time.perf_counter()
        try:
            self.perform_job(job, queue, execution)
        finally:
            self.model_busy_s += time.perf_counter() - started  # with its fetch, encode and save
            self._untrack(job)
            announce_end(self.connection, job.id)

    @staticmethod
    def picture_of(member: Member, batch: Batch, side: int | None) -> None:
        """The member's cached latents when its runner reuses them, else its picture decoded at `side`."""
        if batch.reuses_latents:
            rt = runtime_module.current()
            cached_or_fetched(rt.latents, rt.sd, member, side)
        else:
            member.image = fetch_image(member.ctx, member.payload["image"], min_side=side)

    def look_ahead(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.look_ahead()

    def perform_batch(self, jobs: list[Job], queue, batch: Batch) -> None:
        """RQ's perform_job for jobs sharing one pass (or a batch of one): each is started, finished
        or failed in RQ as if it ran alone (registries, heartbeats, results, TTLs); one timeout, the
        shortest, covers the shared work. Each job's outcome is finalised by the finisher thread."""
        executions = {job.id: self.prepare_execution(job) for job in jobs}
        members = []
        for job in jobs:
            self._track(job, executions[job.id])
            self.prepare_job_execution(job, remove_from_intermediate_queue=len(self.queues) == 1)
            job.started_at = now()
            members.append(Member(job, JobContext(job), job.args[0]))
        if len(jobs) > 1:
            log.info("batch of %d %s jobs: %s", len(jobs), batch.kind, ", ".join(job.id for job in jobs))

        def finalise(member: Member) -> None:
            job, execution = member.job, executions[member.job.id]
            exc_info = settle(member, batch)
            self._untrack(job)
            if exc_info is None:
                self._finalize_success(job, queue, execution, member.result)
            else:
                self._finalize_failure(job, queue, execution, exc_info)
            announce_end(self.connection, job.id)

        def done(member: Member) -> None:
            if not member.done:
                self.finisher.submit(lambda: finalise(member))  # may wait (and be timed out): then retried below
                member.done = True

        timeout = min(job.timeout or self.queue_class.DEFAULT_TIMEOUT for job in jobs)
        try:
            with self.death_penalty_class(timeout, JobTimeoutException, job_id=jobs[0].id):
                side = picture_side(jobs[0].func_name, members[0].payload["params"])
                attempt(members, lambda m: self.picture_of(m, batch, side))
                self.look_ahead()  # the next jobs' pictures are decoded while the model runs these
                started = time.perf_counter()
                try:
                    batch.run(members, done)
                finally:
                    self.model_busy_s += time.perf_counter() - started
        except JobTimeoutException as exc:
            fail_live(members, exc)
        finally:
            for member in members:  # those that failed before their result
                done(member)


def announce_end(connection, job_id: str) -> None:
    """Wake the requests waiting on the job: RQ has stored its outcome by now."""
    try:
        publish_job_event(connection, job_id, "end")
    except redis.RedisError as exc:  # waiters re-read the job on their own within seconds
        log.warning("could not announce the end of job %s: %s", job_id, exc)


def wait_for_redis(connection, error: Exception) -> None:
    """Until Redis answers again: pings with exponential backoff (each ping is itself retried for a
    few seconds by the connection), up to RECONNECT_MAX_S between them."""
    log.warning("redis unreachable (%s): waiting for it", error)
    pause = RECONNECT_FIRST_S
    while True:
        time.sleep(pause)
        try:
            connection.ping()
        except REDIS_DOWN:
            pause = min(2 * pause, RECONNECT_MAX_S)
            continue
        log.info("redis is back")
        return


def claim_name(connection, name: str, settings: Settings) -> None:
    """Once the models are loaded: wait for Redis (a worker may start during an outage) and for `name`
    to be free; a crashed namesake's record is cleaned up and its jobs failed now (namesake.py)."""
    while True:
        try:
            if free_the_name(connection, name, settings.worker_lost_after_s):
                return
            log.warning("a live worker is named %s already: waiting for it to stop or fall silent", name)
            time.sleep(settings.worker_heartbeat_s)
        except REDIS_DOWN as exc:
            wait_for_redis(connection, exc)


class Pulse(threading.Thread):
    def __init__(self, worker: ModelWorker, info: dict, settings: Settings):
        super().__init__(name="attnseg-pulse", daemon=True)
        self.worker, self.info, self.settings = worker, info, settings
        self.stopped = threading.Event()
        self._announcing = threading.Lock()  # the state read and its write together: never a stale one last

    def announce(self) -> list:
        """Write the announcement (busy while a job runs); the running jobs."""
        with self._announcing:
            running = self.worker.running()
            announce(
                self.worker.connection,
                {**self.info, **self.worker.activity(), "state": "busy" if running else "idle"},
                ttl_s=3 * self.settings.worker_heartbeat_s,
            )
        return running

    def beat(self) -> None:
        connection = self.worker.connection
        running = self.announce()
        if self.worker.birth_date is not None:  # registered: RQ's record shows it alive (see namesake.py)
            self.worker.heartbeat()
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


def run_worker(
    settings: Settings, *, queues: tuple[str, ...] = QUEUES, name: str | None = None, burst: bool = False
) -> None:
    connection = connect(settings.redis_url)
    name = name or default_worker_name()
    # Models first: weights that cannot be loaded end the worker with a clear message at once,
    # even when Redis is down (waiting for it would hide the error).
    runtime = runtime_module.load_runtime(settings)
    claim_name(connection, name, settings)
    runtime_module.install(runtime)
    if settings.warmup:
        log.info("warm-up pass took %.1f s", warm_up(runtime))

    ModelWorker.lost_after_s = settings.worker_lost_after_s
    ModelWorker.max_batch = settings.max_batch or (8 if runtime.sd.device.type == "cuda" else 1)
    ModelWorker.prefetch_bytes = settings.prefetch_mb * 2**20
    worker = ModelWorker(
        [get_queue(connection, q) for q in queues], connection=connection, name=name, serializer=JSONSerializer
    )
    info = {
        "name": name,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "queues": list(queues),
        "ready_at": datetime.now(timezone.utc).isoformat(),
        **runtime.describe(),
        "concept_shapes": concept_shapes(runtime.sd),
    }  # the API checks concept uploads against them
    pulse = Pulse(worker, info, settings)
    worker.on_state_change = pulse.announce  # /readyz says busy from a job's start to its end
    pulse.beat()
    pulse.start()
    log.info("worker %s ready (batches of up to %d jobs): %s", name, ModelWorker.max_batch, runtime.describe())
    try:
        worker.work(burst=burst, with_scheduler=False)
    finally:
        pulse.stopped.set()
        pulse.join(timeout=settings.worker_heartbeat_s)  # a beat in progress must not announce us again
        try:
            withdraw(connection, name)
        except redis.RedisError:
            pass
