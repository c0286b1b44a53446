"""Who owns a stored thing (a job, a one-shot model, a concept): the tenant whose key created it.

Every owned record carries `OWNER_FIELD`; records from before tenants existed belong to
`DEFAULT_TENANT` (the tenant of the single `ATTNSEG_API_KEY`, and of every caller when auth is off).
Another tenant is told the thing does not exist (404), never that it is someone else's.
"""

from __future__ import annotations

DEFAULT_TENANT = "default"
OWNER_FIELD = "owner"


def owner_of(record: dict) -> str:
    return record.get(OWNER_FIELD) or DEFAULT_TENANT


def owned_by(record: dict | None, tenant: str) -> bool:
    """True when `record` exists and belongs to `tenant`."""
    return record is not None and owner_of(record) == tenant


def stamp(record: dict, tenant: str) -> dict:
    """`record` with its owner set (a new dict)."""
    return {**record, OWNER_FIELD: tenant}
