"""Keys never travel in URLs: a request with a key-looking query parameter is refused (401) before
any route runs, and the access log writes such a parameter's value as `***`.

URLs are written to access logs, proxies' logs and browser histories; a key sent as `?api_key=...`
is exposed even when the request is refused, so the refusal says to rotate it, and uvicorn's access
log line (the one place this process logs the URL) is scrubbed.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import parse_qsl, unquote_plus

from service.errors import error_response

# Parameter names that look like a credential: api_key, apiKey, key, access_token, password, auth, ...
SECRET_NAME = re.compile(r"key|token|secret|passw|auth|bearer|credential|signature|session", re.IGNORECASE)
# name=value inside a query string, the value up to the next & (or the end, or a # or space).
QUERY_PAIR = re.compile(r"(?P<name>[^?&=#\s]+)=(?P<value>[^&#\s]*)")
ACCESS_LOGGER = "uvicorn.access"


def secret_names(query: str) -> list[str]:
    """The key-looking parameter names of a raw query string."""
    return [name for name, _ in parse_qsl(query, keep_blank_values=True) if SECRET_NAME.search(name)]


def scrubbed(text: str) -> str:
    """`text` (a path with its query, or a whole log line) with key-looking parameters' values as ***."""

    def mask(match: re.Match) -> str:
        return f"{match['name']}=***" if SECRET_NAME.search(unquote_plus(match["name"])) else match[0]

    return QUERY_PAIR.sub(mask, text)


class UrlSecretsMiddleware:
    """Pure ASGI: 401 for a key-looking query parameter, before the app (and its routes) see the request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            names = secret_names(scope.get("query_string", b"").decode("latin-1"))
            if names:
                response = error_response(
                    401,
                    "key_in_url",
                    f"the query parameter {names[0]!r} looks like a credential: URLs are logged, so keys are "
                    "refused there; send 'Authorization: Bearer <key>' and rotate a key that was sent in a URL",
                    field=names[0][:64],
                    headers={"WWW-Authenticate": "Bearer"},
                )
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class ScrubUrlSecrets(logging.Filter):
    """A log filter: key-looking query parameters' values become *** in the record's arguments
    (uvicorn's access record carries the path with its query as an argument) and message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(scrubbed(a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = scrubbed(record.msg)
        return True


def scrub_access_log() -> None:
    """Install the filter on uvicorn's access logger (once)."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(f, ScrubUrlSecrets) for f in logger.filters):
        logger.addFilter(ScrubUrlSecrets())
