"""Request body cap, enforced while the body is read (not after it has been buffered)."""

from __future__ import annotations

from service.errors import error_response


class BodyTooLargeError(Exception):
    pass


class BodySizeLimitMiddleware:
    """Pure ASGI middleware: 413 as soon as a body passes `max_bytes`, by header or while streaming."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self):
        return error_response(
            413,
            "payload_too_large",
            f"request body exceeds the limit of {self.max_bytes} bytes ({self.max_bytes / 1048576:.1f} MiB)",
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large()(scope, receive, send)

        received = 0
        response_started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError
            return message

        async def tracking_send(message):
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLargeError:
            if response_started:
                raise
            await self._too_large()(scope, receive, send)
