"""Shutting down: an app-level event set when the server is asked to stop (SIGTERM, Ctrl-C), so
long-polls answer with the job's current state at once instead of holding the exit for up to 60 s."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI

from service.url_secrets import scrub_access_log


def open_lifecycle(app: FastAPI) -> None:
    """At start-up, in the server's event loop: the shutdown event and the loop a signal reaches it through."""
    app.state.loop = asyncio.get_running_loop()
    app.state.shutting_down = asyncio.Event()


def begin_shutdown(app: FastAPI) -> None:
    event = getattr(app.state, "shutting_down", None)
    if event is not None:
        event.set()


async def wait_unless_shutting_down(app: FastAPI, event: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds` for `event`; False as soon as the app is shutting down (the caller answers now).

    Without a lifespan (an app driven without start-up, as some test clients do) only `event` counts.
    """
    shutting_down = getattr(app.state, "shutting_down", None)
    if shutting_down is not None and shutting_down.is_set():
        return False
    waits = [asyncio.ensure_future(e.wait()) for e in (event, shutting_down) if e is not None]
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()
    return shutting_down is None or not shutting_down.is_set()


def serve(app: FastAPI, *, host: str, port: int) -> None:
    """Run `app` under uvicorn; a stop signal first wakes every long-poll, then uvicorn drains requests."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            loop = getattr(app.state, "loop", None)
            if loop is not None:
                loop.call_soon_threadsafe(begin_shutdown, app)

    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    scrub_access_log()  # again: uvicorn's logging configuration has just been applied
    Server(config).run()
