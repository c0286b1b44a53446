"""A job's pictures: fetched from the store and decoded at the working size, or decoded ahead.

While the model works on one batch, a `Prefetcher` thread decodes the pictures of the jobs waiting
at the front of the queue, so the next batch starts with its pictures in memory instead of
spending its first milliseconds (a 12 MP JPEG: tens of them) on Redis and the JPEG decoder.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
import redis
from rq.job import Job
from rq.serializers import JSONSerializer

from attnseg.images import ImageMissingError, load_image
from workers.engine.context import JobContext, JobFailure

log = logging.getLogger("attnseg.worker")


_prefetcher: Prefetcher | None = None


def install_prefetcher(prefetcher: Prefetcher | None) -> None:
    """The worker's look-ahead, which `fetch_image` reads from (None: every picture is fetched)."""
    global _prefetcher
    _prefetcher = prefetcher


def load_picture(connection, key: str, *, min_side: int | None = None) -> np.ndarray:
    """`load_image`, from the pictures decoded ahead when the worker has a look-ahead."""
    if _prefetcher is None:
        return load_image(connection, key, min_side=min_side)
    return _prefetcher.load(connection, key, min_side=min_side)


def fetch_image(ctx: JobContext, entry: dict, load=load_picture, **options) -> np.ndarray:
    """(H, W, 3) uint8 RGB (`load_mask`: (H, W) uint8 class ids) of a payload's picture entry.

    options: min_side, to decode no larger than the working size needs (the entry's width and
    height stay the original's, for the masks: see `original_size`)."""
    started = time.perf_counter()
    try:
        image = load(ctx.connection, entry["key"], **options)
    except ImageMissingError as exc:
        raise JobFailure("image_expired", str(exc)) from None
    ctx.stages_ms["fetch"] = round(ctx.stages_ms.get("fetch", 0.0) + (time.perf_counter() - started) * 1000, 1)
    return image


def original_size(entry: dict) -> tuple[int, int]:
    """(H, W) of a payload's picture after EXIF orientation: the masks' size."""
    return entry["height"], entry["width"]


class Prefetcher(threading.Thread):
    """Decodes the pictures of the first `depth` jobs of `queue_keys` whenever `look_ahead()` is called.

    It claims nothing: a job that another worker takes, or that is canceled, costs one decode, and
    its picture is dropped as newer ones need the room. At most 2 x `depth` pictures (those of the
    jobs starting now, not all taken yet, and those of the next ones) and `max_bytes` of pixels are held.
    `side_of(function, params)` is the working size a queued job's picture is
    decoded at (`min_side` of `load_image`), None for a job whose picture is fetched as it starts.
    """

    def __init__(
        self, connection, queue_keys: list[str], side_of: Callable[[str, dict], int | None], depth: int, max_bytes: int
    ):
        super().__init__(name="attnseg-prefetch", daemon=True)
        self.connection, self.queue_keys, self.side_of = connection, queue_keys, side_of
        self.depth, self.max_bytes = depth, max_bytes
        self.hits = self.misses = 0
        self._pictures: OrderedDict[tuple[str, int | None], Future] = OrderedDict()
        self._looked_at: OrderedDict[str, None] = OrderedDict()  # job ids already read, newest last
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False

    def look_ahead(self) -> None:
        """Decode what waits at the front of the queues (returns at once; the thread does it)."""
        self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    def load(self, connection, key: str, *, min_side: int | None = None) -> np.ndarray:
        """`load_image`, from the pictures decoded ahead when it is there (waiting for one in progress)."""
        with self._lock:
            future = self._pictures.pop((key, min_side), None)
        if future is not None:
            try:
                image = future.result()
                self.hits += 1
                return image
            except Exception:  # noqa: BLE001 - fetched again below, so the job reports its own error
                pass
        self.misses += 1
        return load_image(connection, key, min_side=min_side)

    def run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopped:
                return
            try:
                self.decode_front()
            except redis.RedisError as exc:  # the jobs fetch their own pictures then
                log.warning("prefetch: redis unavailable: %s", exc)
            except Exception:
                log.exception("prefetch failed")

    def decode_front(self) -> None:
        with self.connection.pipeline(transaction=False) as pipe:
            for key in self.queue_keys:
                pipe.lrange(key, 0, self.depth - 1)
            queued = [raw.decode() for ids in pipe.execute() for raw in ids][: self.depth]
        new = [job_id for job_id in queued if job_id not in self._looked_at]
        for job_id in new:
            self._looked_at[job_id] = None
        while len(self._looked_at) > 4 * self.depth:
            self._looked_at.popitem(last=False)
        jobs = Job.fetch_many(new, connection=self.connection, serializer=JSONSerializer) if new else []
        for job in jobs:
            picture = self.picture_of(job)
            if picture is None:
                continue
            with self._lock:
                if picture in self._pictures:
                    continue
                future = self._pictures[picture] = Future()
                self._evict()
            try:
                future.set_result(load_image(self.connection, picture[0], min_side=picture[1]))
            except Exception as exc:  # noqa: BLE001 - a gone or bad picture: the job's own fetch says so
                future.set_exception(exc)
            with self._lock:
                self._evict()

    def picture_of(self, job: Job | None) -> tuple[str, int] | None:
        """(image key, working size) of a queued job's picture; None for jobs not decoded ahead."""
        payload = job.args[0] if job is not None and job.args else None
        if not isinstance(payload, dict) or "key" not in (payload.get("image") or {}):
            return None
        try:
            side = self.side_of(job.func_name, payload.get("params", {}))
        except (KeyError, TypeError, ValueError):
            return None
        return (payload["image"]["key"], side) if side is not None else None

    def _evict(self) -> None:
        """Oldest first, down to 2 x `depth` pictures and `max_bytes` of decoded pixels (under the lock)."""
        while len(self._pictures) > 2 * self.depth:
            self._pictures.popitem(last=False)
        held = sum(f.result().nbytes for f in self._pictures.values() if f.done() and f.exception() is None)
        while held > self.max_bytes and self._pictures:
            _, future = self._pictures.popitem(last=False)
            if future.done() and future.exception() is None:
                held -= future.result().nbytes
