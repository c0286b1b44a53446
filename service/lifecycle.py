"""Shutting down: an app-level event set when the server is asked to stop (SIGTERM, Ctrl-C), so
long-polls answer with the job's current state at once instead of holding the exit for up to 60 s."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI


def open_lifecycle(app: FastAPI) -> None:
    """At start-up, in the server's event loop: the shutdown event and the loop a signal reaches it through."""
    app.state.loop = asyncio.get_running_loop()
    app.state.shutting_down = asyncio.Event()


def begin_shutdown(app: FastAPI) -> None:
    event = getattr(app.state, "shutting_down", None)
    if event is not None:
        event.set()


async def pause_unless_shutting_down(app: FastAPI, seconds: float) -> bool:
    """Sleep up to `seconds`; False as soon as the app is shutting down (the caller answers now).

    Without a lifespan (an app driven without start-up, as some test clients do) it just sleeps.
    """
    event = getattr(app.state, "shutting_down", None)
    if event is None:
        await asyncio.sleep(seconds)
        return True
    if event.is_set():
        return False
    try:
        await asyncio.wait_for(event.wait(), timeout=seconds)
    except asyncio.TimeoutError:
        return True
    return False


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
    Server(config).run()
