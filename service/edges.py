"""What every answer carries at the edge: security headers, and CORS for the configured origins."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",  # a JSON error or an upload's echo is never run as a script
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
# For API answers (JSON, PNG); the HTML pages (/docs, a UI) need their own scripts and styles.
NON_HTML_CSP = "default-src 'none'; frame-ancestors 'none'"


class SecurityHeadersMiddleware:
    """Pure ASGI: adds the headers to every response start, errors and 413s from inner middleware included."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                present = {name.lower() for name, _ in headers}
                extra = dict(SECURITY_HEADERS)
                content_type = dict(headers).get(b"content-type", b"")
                if not content_type.startswith(b"text/html"):
                    extra["Content-Security-Policy"] = NON_HTML_CSP
                headers += [
                    (name.lower().encode(), value.encode())
                    for name, value in extra.items()
                    if name.lower().encode() not in present
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install_edges(app: FastAPI, cors_origins: list[str]) -> None:
    """Call after the other middleware: these wrap them all (the last added is the outermost)."""
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Location", "Retry-After"],
            max_age=600,
        )
    app.add_middleware(SecurityHeadersMiddleware)
