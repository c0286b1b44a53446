"""The web playground: static HTML, CSS and ES modules under /ui (no build step, no CDN)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

UI_DIR = Path(__file__).resolve().parent.parent / "ui"

# The page works under this policy (no inline script or style; pictures drawn from blob: URLs).
# nosniff, the frame and referrer headers come with every answer (service.edges).
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'none'",
    "Cache-Control": "no-cache",  # revalidate (ETag): an upgrade of the service never mixes old and new files
}


class PlaygroundFiles(StaticFiles):
    """StaticFiles with the playground's headers on every file it serves (its hook for responses)."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers.update(HEADERS)
        return response


def mount_ui(app: FastAPI) -> None:
    """`/ui` redirects to `/ui/` (index.html); the assets are `/ui/style.css`, `/ui/js/*.js`."""
    app.mount("/ui", PlaygroundFiles(directory=UI_DIR, html=True), name="ui")
