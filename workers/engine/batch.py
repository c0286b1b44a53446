"""Cross-request batching: queued jobs that can share one model pass run it once.

A worker that dequeues a batchable job (its kind names a `Batch` in attnseg.queue.KINDS) also takes up to
`max_batch - 1` compatible jobs from the front of the same queue. Each is claimed with LREM, which
removes an id only once, so exactly one worker ever gets a job. The batch runs the shared pass
once; every job keeps its own progress, cancellation, result and failure (a `Member` carries them).
A batchable job that finds no companion runs the same way, as a batch of one.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from rq.job import Job
from rq.serializers import JSONSerializer

from workers.engine.context import JobCanceled, JobContext, job_outcome, report_progress

CLAIM_WINDOW = 64  # queued ids looked at for companions, from the front of the queue


@dataclass
class Member:
    """One job of a batch: its context and payload, then its result or the error that ended it.

    The runner may leave the last step to the worker's finishing thread: `encode` then turns the
    model's output (kept in the closure) into the result, off the model's thread."""

    job: Job | None
    ctx: JobContext
    payload: dict
    started: float = field(default_factory=time.perf_counter)
    result: dict | None = None
    encode: Callable[[], dict] | None = None
    error: BaseException | None = None
    done: bool = False  # handed over to be finalised
    image: np.ndarray | None = None  # (H, W, 3) uint8, decoded at the working size before the runner starts
    latents: torch.Tensor | None = None  # (1, 4, r, r): its picture's clean latents, cached (then no image)

    @property
    def live(self) -> bool:
        return self.error is None and self.result is None and self.encode is None


@dataclass(frozen=True)
class Batch:
    """How jobs of one function share a pass: `share_key(params)` equal (None: never shared), and
    `run(members, done)`, which calls `done(member)` as each member gets its result (or `encode`).
    The worker decodes each member's picture (at `dispatch.picture_side`) before `run`; with
    `reuses_latents`, a member whose clean latents at `params["resolution"]` are in the worker's
    latent cache gets them (`Member.latents`) instead, and the runner starts from `member_latents`."""

    kind: str
    share_key: Callable[[dict], tuple | None]
    run: Callable[[list[Member], Callable[[Member], None]], None]
    on_error: Callable | None = None
    reuses_latents: bool = False


def attempt(members: list[Member], step: Callable[[Member], object]) -> None:
    """`step(member)` for each live member; an exception ends that member only."""
    for member in members:
        if member.live:
            try:
                step(member)
            except Exception as exc:  # noqa: BLE001 - recorded, settled through job_outcome
                member.error = exc


def fail_live(members: list[Member], error: BaseException) -> None:
    """A shared step failed: every member still running fails with it."""
    for member in members:
        if member.live:
            member.error = error


def shared_report(members: list[Member]) -> Callable[[str, float], None]:
    """Progress of a shared step to every live member in one round trip; a member canceled meanwhile
    drops out (its row is still computed, nothing more is done for it)."""

    def report(stage: str, fraction: float) -> None:
        live = [member for member in members if member.live]
        for index in report_progress([member.ctx for member in live], stage, fraction):
            live[index].error = JobCanceled()

    return report


def settle(member: Member, batch: Batch):
    """The member's result (its `encode`, if the runner left one) and outcome, through the job's own
    error handling (messages, metrics, on_error).

    Returns None on success, else the exc_info RQ stores for the failure.
    """
    try:
        with job_outcome(member.ctx, batch.kind, member.payload, batch.on_error, started=member.started):
            if member.error is not None:
                raise member.error
            if member.encode is not None:
                # dropped once used: the closure refers back to the member, and the cycle would keep
                # the label map alive until the garbage collector runs (every fresh 12 MP map then
                # costs new pages: labels ran 2x slower)
                encode, member.encode = member.encode, None
                member.result = encode()
    except Exception:  # noqa: BLE001 - handed to RQ
        return sys.exc_info()
    return None


def share_key_of(job: Job, batch: Batch) -> tuple | None:
    return batch.share_key(job.meta.get("params", {}))


def claim_companions(connection, queue, key: tuple, batch: Batch, limit: int) -> list[Job]:
    """Up to `limit` queued jobs whose share key is `key` (the dequeued job's), taken off `queue` atomically."""
    if limit < 1:
        return []
    ids = [raw.decode() for raw in connection.lrange(queue.key, 0, CLAIM_WINDOW - 1)]
    with connection.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hget(Job.key_for(job_id), "meta")
        metas = pipe.execute()
    wanted = []
    for job_id, raw in zip(ids, metas):
        meta = JSONSerializer.loads(raw) if raw else {}
        if meta.get("kind") == batch.kind and batch.share_key(meta.get("params", {})) == key:
            wanted.append(job_id)
            if len(wanted) == limit:
                break
    if not wanted:
        return []
    with connection.pipeline(transaction=False) as pipe:
        for job_id in wanted:
            pipe.lrem(queue.key, 1, job_id)  # 1: ours; 0: another worker (or a cancel) was first
        taken = [job_id for job_id, removed in zip(wanted, pipe.execute()) if removed]
    jobs = Job.fetch_many(taken, connection=connection, serializer=JSONSerializer) if taken else []
    return [job for job in jobs if job is not None]
