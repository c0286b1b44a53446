"""Tenants and their API keys (the `current_tenant` dependency on them is in service.deps).

Keys come from `ATTNSEG_API_KEYS` (`tenant:key,tenant:key`), `ATTNSEG_API_KEYS_FILE` (one
`tenant:key` a line, `#` comments; re-read when its modification time changes) and the single
`ATTNSEG_API_KEY` (tenant `default`). With no key configured, auth is off and every caller is
tenant `default`. Operators' keys (`ATTNSEG_ADMIN_KEYS`, comma-separated) are apart from tenants':
they open `/metrics` and `/readyz` details, and nothing a tenant owns. Keys are compared in constant
time and never logged.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import threading
from pathlib import Path

from attnseg.ownership import DEFAULT_TENANT
from attnseg.settings import Settings

log = logging.getLogger("attnseg.api")

TENANT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class KeyConfigError(ValueError):
    """A malformed key configuration (the message names the source, never the key)."""


def parse_pairs(text: str, source: str, separator: str) -> list[tuple[str, bytes]]:
    """'tenant:key' entries separated by `separator` -> [(tenant, key bytes)]."""
    pairs = []
    for number, entry in enumerate(text.split(separator), start=1):
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        tenant, colon, key = entry.partition(":")
        tenant, key = tenant.strip(), key.strip()
        if not colon or not key or not TENANT_NAME.fullmatch(tenant):
            raise KeyConfigError(
                f"{source}: entry {number} is not 'tenant:key' (tenant: letters, digits, '_.-', up to 64)"
            )
        pairs.append((tenant, key.encode()))
    return pairs


class KeyRing:
    """Every configured (tenant, key); the keys file is re-read when its mtime changes."""

    def __init__(self, settings: Settings):
        self.fixed: list[tuple[str, bytes]] = []
        if settings.api_key:
            self.fixed.append((DEFAULT_TENANT, settings.api_key.encode()))
        if settings.api_keys:
            self.fixed += parse_pairs(settings.api_keys, "ATTNSEG_API_KEYS", ",")
        self.admin = [key.strip().encode() for key in (settings.admin_keys or "").split(",") if key.strip()]
        self.path: Path | None = settings.api_keys_file
        self._file_pairs: list[tuple[str, bytes]] = []
        self._mtime: int | None = None
        self._lock = threading.Lock()
        if self.path is not None:
            self._refresh()  # a broken file at start-up is an error, not an open API

    def _refresh(self) -> None:
        mtime = os.stat(self.path).st_mtime_ns
        if mtime == self._mtime:
            return
        with self._lock:
            self._file_pairs = parse_pairs(self.path.read_text(), str(self.path), "\n")
            self._mtime = mtime
            log.info("API keys file %s loaded: %d tenants' keys", self.path, len(self._file_pairs))

    def pairs(self) -> list[tuple[str, bytes]]:
        if self.path is not None:
            try:
                self._refresh()
            except (OSError, KeyConfigError) as exc:  # keep the last good keys; say why
                log.error("API keys file not reloaded: %s", exc)
        return self.fixed + self._file_pairs

    @property
    def enabled(self) -> bool:
        return bool(self.fixed) or self.path is not None

    @property
    def operators_only(self) -> bool:
        """Whether operations details need an admin key: once any key, a tenant's or an admin's, is set."""
        return self.enabled or bool(self.admin)

    def is_admin(self, token: str) -> bool:
        """Whether this is an operator's key (compared with every admin key: constant time)."""
        given = token.encode()
        return sum(hmac.compare_digest(given, key) for key in self.admin) > 0

    def tenant_of(self, token: str) -> str | None:
        """The tenant whose key this is, comparing against every key (no early exit: constant time)."""
        given = token.encode()
        found = None
        for tenant, key in self.pairs():
            if hmac.compare_digest(given, key):
                found = tenant
        return found
