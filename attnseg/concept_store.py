"""Concepts (learned or imported identifiers, docs/methods.md 2.4), stored durably in Redis.

A record (attnseg.record_store) holds: id, owner, identifier, class_word, method
(custom_diffusion | textual_inversion), status (training | importing | ready | failed), the SD model,
parameters, metrics, the job that makes it, and, when ready, its diffusers files as binary parts
(`learned_embeds.safetensors`, and `pytorch_custom_diffusion_weights.safetensors` for Custom
Diffusion). Each owner's identifiers are unique: queries name concepts by identifier.
"""

from __future__ import annotations

from attnseg.ownership import owner_of
from attnseg.queue import CONCEPT_INDEX_KEY, CONCEPT_PREFIX, concept_identifier_key
from attnseg.record_store import RecordStore, new_id

store = RecordStore(CONCEPT_PREFIX, CONCEPT_INDEX_KEY)
new_concept_id = new_id
UPLOAD_PREFIX = "upload-"  # imported files as sent, until the worker has checked them


class IdentifierTakenError(Exception):
    def __init__(self, identifier: str, concept_id: str):
        super().__init__(f"<{identifier}> is already the identifier of concept {concept_id}")
        self.concept_id = concept_id


def create(
    connection,
    concept_id: str,
    *,
    owner: str,
    identifier: str,
    class_word: str,
    method: str,
    status: str,
    params: dict,
    job_id: str,
    name: str | None = None,
    description: str | None = None,
) -> dict:
    """Claim the identifier for the owner and create the record; IdentifierTakenError if it is used."""
    claim = concept_identifier_key(owner, identifier)
    if not connection.set(claim, concept_id, nx=True):
        raise IdentifierTakenError(identifier, (connection.get(claim) or b"?").decode())
    return store.create(
        connection,
        concept_id,
        {
            "name": name,
            "description": description,
            "identifier": identifier,
            "class_word": class_word,
            "method": method,
            "status": status,
            "params": params,
            "sd_model": None,
            "job_id": job_id,
            "metrics": {},
        },
        owner=owner,
    )


def by_identifier(connection, owner: str, identifier: str) -> dict | None:
    concept_id = connection.get(concept_identifier_key(owner, identifier))
    return None if concept_id is None else store.get(connection, concept_id.decode(), owner=owner)


def delete(connection, concept_id: str) -> bool:
    record = store.get_any(connection, concept_id)
    if record is None:
        return False
    claim = concept_identifier_key(owner_of(record), record["identifier"])
    if connection.get(claim) == concept_id.encode():
        connection.delete(claim)
    return store.delete(connection, concept_id)
