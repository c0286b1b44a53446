"""Job signals from the workers ("progress", "end"), fanned out to the requests waiting in this API process.

One pattern subscription per process (redis.asyncio pub/sub) however many requests wait; each
waiting request holds an asyncio.Event that the listener sets when its job's "end" arrives (or any
signal, for a request that also waits for progress). When
the subscription is down (Redis restarting), waiters fall back to re-reading the job on a timer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import redis
import redis.asyncio as aioredis

from attnseg.queue import JOB_EVENTS_PATTERN, job_events_channel

log = logging.getLogger("attnseg.api")

RECONNECT_S = 1.0


class JobEvents:
    def __init__(self, url: str):
        self.url = url
        self.listening = False
        self._waiters: dict[str, set[asyncio.Event]] = {}  # woken when their job ends
        self._progress_waiters: dict[str, set[asyncio.Event]] = {}  # ... or reports progress
        self._task: asyncio.Task | None = None
        self._prefix = job_events_channel("")

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="attnseg-job-events")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    @contextmanager
    def watch(self, job_id: str, *, progress: bool = False) -> Iterator[asyncio.Event]:
        """An event set when `job_id` ends (and, with `progress`, when it reports progress);
        register BEFORE reading the job, so no signal is missed."""
        event = asyncio.Event()
        waiters = self._progress_waiters if progress else self._waiters
        waiters.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            events = waiters.get(job_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del waiters[job_id]

    def _wake(self, job_id: str, signal: bytes = b"end") -> None:
        for event in self._progress_waiters.get(job_id, ()):
            event.set()
        if signal == b"end":
            for event in self._waiters.get(job_id, ()):
                event.set()

    def _wake_all(self) -> None:
        for job_id in {*self._waiters, *self._progress_waiters}:
            self._wake(job_id)

    async def _listen(self) -> None:
        while True:
            client = aioredis.Redis.from_url(self.url)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.psubscribe(JOB_EVENTS_PATTERN)
                    self.listening = True
                    self._wake_all()  # an end may have come while we were not subscribed
                    async for message in pubsub.listen():
                        if message["type"] == "pmessage":
                            self._wake(message["channel"].decode().removeprefix(self._prefix), message["data"])
            except (redis.RedisError, OSError) as exc:
                log.warning("job events: redis unavailable (%s); waiting requests poll meanwhile", exc)
            finally:
                self.listening = False
                await client.aclose()
            await asyncio.sleep(RECONNECT_S)
