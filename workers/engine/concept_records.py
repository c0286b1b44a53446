"""Concepts named by a job, read from their records and checked against this worker's model."""

from __future__ import annotations

from attnseg.concept_store import store
from workers.engine import runtime
from workers.engine.context import JobContext, JobFailure
from workers.models.concept import Concept, ConceptMismatchError, check_concept


def load_concepts(ctx: JobContext, concept_ids: dict[str, str]) -> dict[str, Concept]:
    """identifier -> Concept of ready concepts, checked against this worker's model."""
    rt = runtime.current()
    concepts = {}
    for identifier, concept_id in concept_ids.items():
        record = store.get_any(ctx.connection, concept_id)
        if record is None:
            raise JobFailure("concept_deleted", f"concept <{identifier}> ({concept_id}) does not exist (deleted)")
        if record["status"] != "ready":
            reason = (record.get("error") or {}).get("message", "its training did not finish")
            raise JobFailure("concept_failed", f"concept <{identifier}> is not usable: {reason}")
        files = {name: store.get_file(ctx.connection, concept_id, name) for name in record["files"]}
        concept = Concept.from_files(files, record["identifier"], record["class_word"], sd_model=record["sd_model"])
        try:
            check_concept(rt.sd, concept)
        except ConceptMismatchError as exc:
            raise JobFailure("concept_mismatch", str(exc)) from None
        concepts[identifier] = concept
    return concepts
