"""What a running job sees of the queue: progress reporting, cancellation, user-facing failures."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from attnseg.job_metrics import record_job_duration
from attnseg.queue import cancel_key, job_kind, publish_job_event

log = logging.getLogger("attnseg.worker")

# Progress is written, and cancellation checked, at most this often: a job of a few tens of ms makes
# one round trip for it, a long one still shows every stage that lasts longer.
PROGRESS_EVERY_S = 0.5
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)


class JobFailure(Exception):
    """A failure the user can act on (bad model id, expired image...): its message is shown as is."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class JobCanceled(Exception):
    pass


class JobContext:
    """Progress and cancellation for the current RQ job; a no-op outside a worker (Python API use)."""

    def __init__(self, job=None):
        self.job = job
        self.stages_ms: dict[str, float] = {}  # the engine's own stages (image fetch), added to the timings
        self._written_at: float | None = None
        self._unwritten = False  # a report held back by the throttle

    @property
    def connection(self):
        return self.job.connection if self.job else None

    def report(self, stage: str, fraction: float, **extra) -> None:
        """Publish progress and stop here if the job was canceled (the check between steps), at most
        every PROGRESS_EVERY_S; the first report always goes out."""
        if report_progress([self], stage, fraction, **extra):
            raise JobCanceled

    def flush_progress(self) -> None:
        """Write the last report if the throttle held it back: a finished job shows where it ended
        (a training's last epoch), not the report before it."""
        if self.job is not None and self._unwritten:
            self.job.save_meta()
            self._unwritten = False

    def update_params(self, **values) -> None:
        """Record what the worker actually used (model ids) in the job's echoed params."""
        if self.job is None:
            return
        self.job.meta["params"] = {**self.job.meta.get("params", {}), **values}
        self.job.save_meta()

    def fail(self, code: str, message: str) -> None:
        if self.job is not None:
            if code != "canceled":
                self.job.meta["error"] = {"code": code, "message": message}
            try:
                self.job.save_meta()
            except REDIS_DOWN as exc:  # the job's own exception goes on to RQ, which says why
                log.warning("job %s: its error could not be saved: %s", self.job.id, exc)


def report_progress(contexts: list[JobContext], stage: str, fraction: float, **extra) -> set[int]:
    """`report` for several jobs (a batch) in one round trip: each job's progress written, announced
    and its cancellation checked, at most every PROGRESS_EVERY_S. Returns the indexes of the
    contexts whose job was canceled."""
    progress = {"stage": stage, "fraction": round(min(max(fraction, 0.0), 1.0), 4), **extra}
    moment = time.monotonic()
    due = []
    for index, ctx in enumerate(contexts):
        if ctx.job is None:
            continue
        ctx.job.meta["progress"] = progress
        ctx._unwritten = True
        if ctx._written_at is None or moment - ctx._written_at >= PROGRESS_EVERY_S:
            ctx._written_at = moment
            ctx._unwritten = False
            due.append(index)
    if not due:
        return set()
    with contexts[due[0]].connection.pipeline(transaction=False) as pipe:
        for index in due:
            job = contexts[index].job
            pipe.hset(job.key, "meta", job.serializer.dumps(job.meta))  # as job.save_meta()
            publish_job_event(pipe, job.id, "progress")
            pipe.exists(cancel_key(job.id))
        canceled = pipe.execute()[2::3]
    return {index for index, flag in zip(due, canceled) if flag}


@contextmanager
def job_outcome(
    ctx: JobContext,
    kind: str,
    payload: dict,
    on_error: Callable[[JobContext, dict, dict], None] | None = None,
    started: float | None = None,
) -> Iterator[None]:
    """Around a job's body: errors become a clear message (re-raised for RQ), durations a metric.

    `on_error(ctx, payload, error)` runs for every outcome but success (failure, cancel, timeout), so
    a job can record the error where users look for it (a one-shot model's record, say). `started`:
    when the job's work began (a batch's shared pass), default now.
    """
    started = time.perf_counter() if started is None else started
    outcome = "failed"
    try:
        yield
        outcome = "succeeded"
        ctx.flush_progress()
    except JobCanceled:
        outcome = "canceled"
        error = {"code": "canceled", "message": "canceled by request"}
        if ctx.job is not None:
            ctx.job.meta["canceled"] = True
        raise
    except JobFailure as exc:
        error = {"code": exc.code, "message": str(exc)}
        raise
    except REDIS_DOWN:  # the API shows it as store_unavailable (service.job_view), not as a bug
        log.warning("%s job lost redis", kind)
        error = {"code": "store_unavailable", "message": "the job store (Redis) became unreachable"}
        raise
    except JobTimeoutException:
        timeout = ctx.job.timeout if ctx.job else "?"
        error = {"code": "timeout", "message": f"the job ran longer than its limit of {timeout} s"}
        raise
    except Exception as exc:
        log.exception("%s job failed", kind)
        error = {
            "code": "internal_error",
            "message": f"the worker failed: {type(exc).__name__}: {exc}; this is a bug, please report it",
        }
        raise
    finally:
        if outcome != "succeeded":
            ctx.fail(**error)
            if on_error is not None and ctx.connection is not None:
                on_error(ctx, payload, error)
        if ctx.connection is not None:
            record_job_duration(ctx.connection, kind, outcome, time.perf_counter() - started)


def job_function(kind: str, on_error: Callable[[JobContext, dict, dict], None] | None = None) -> Callable:
    """Wrap a job body `fn(ctx, payload)` for RQ, under `job_outcome`; `kind` must be registered in
    attnseg.queue.KINDS (ValueError at import otherwise), and is kept as the function's `job_kind`."""
    job_kind(kind)

    def decorate(fn):
        @functools.wraps(fn)
        def run(payload: dict):
            ctx = JobContext(get_current_job())
            with job_outcome(ctx, kind, payload, on_error):
                return fn(ctx, payload)

        run.job_kind = kind
        return run

    return decorate
