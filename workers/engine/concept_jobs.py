"""Job functions for concepts (docs/methods.md 2.4): training, import, referring segmentation."""

from __future__ import annotations

import time

from attnseg.concept_files import EMBEDDINGS_FILE, KV_FILE, ConceptFileError
from attnseg.concept_store import UPLOAD_PREFIX, store
from attnseg.images import load_mask
from workers.engine import runtime
from workers.engine.concept_records import load_concepts
from workers.engine.context import JobContext, JobFailure, job_function
from workers.engine.jobs import finish, segments_from_labels, timings
from workers.engine.pictures import fetch_image
from workers.methods.concepts import train_concept
from workers.methods.prompts import PromptTooLongError
from workers.methods.referring import segment_referring as run_referring
from workers.models.concept import Concept, ConceptMismatchError, check_concept


def mark_concept_failed(ctx: JobContext, payload: dict, error: dict) -> None:
    store.update(ctx.connection, payload["concept_id"], status="failed", error=error)


def save_concept(ctx: JobContext, concept_id: str, concept: Concept, **fields) -> None:
    """Store the concept's files, then mark it ready; JobFailure when it was deleted meanwhile."""
    for name, data in concept.files().items():
        if store.put_file(ctx.connection, concept_id, name, data) is None:
            raise JobFailure("concept_deleted", f"concept {concept_id} was deleted before it was saved")
    if (
        store.update(
            ctx.connection,
            concept_id,
            status="ready",
            vectors=int(concept.vectors.shape[0]),
            sd_model=runtime.current().sd.model_id,
            **fields,
        )
        is None
    ):
        raise JobFailure("concept_deleted", f"concept {concept_id} was deleted before it was saved")


@job_function("concept_train", on_error=mark_concept_failed)
def concept_train(ctx: JobContext, payload: dict) -> dict:
    rt = runtime.current()
    params = payload["params"]
    concept_id = payload["concept_id"]
    record = store.update(ctx.connection, concept_id, sd_model=rt.sd.model_id)
    if record is None:
        raise JobFailure("concept_deleted", f"concept {concept_id} was deleted before its training started")
    ctx.update_params(sd_model=rt.sd.model_id)
    photos = [fetch_image(ctx, entry) for entry in payload["photos"]]
    masks = [fetch_image(ctx, entry, load_mask) > 0 for entry in payload["masks"]] if payload.get("masks") else None
    concept = train_concept(
        rt.sd,
        photos,
        record["identifier"],
        record["class_word"],
        masks=masks,
        train_kv=params["train_kv"],
        steps=params["steps"],
        learning_rate=params["learning_rate"],
        batch_size=params["batch_size"],
        num_vectors=params["num_vectors"],
        resolution=params["resolution"],
        seed=params["seed"],
        report=ctx.report,
    )
    save_concept(ctx, concept_id, concept, metrics=concept.metrics)
    return {
        "concept_id": concept_id,
        "identifier": record["identifier"],
        "metrics": concept.metrics,
        "random_weights": rt.sd.random_weights,
    }


@job_function("concept_import", on_error=mark_concept_failed)
def concept_import(ctx: JobContext, payload: dict) -> dict:
    """Read the uploaded diffusers files (safetensors, or torch files with weights_only), check them
    against this worker's SD model, and keep them as the concept's files."""
    rt = runtime.current()
    concept_id = payload["concept_id"]
    record = store.get_any(ctx.connection, concept_id)
    if record is None:
        raise JobFailure("concept_deleted", f"concept {concept_id} was deleted before its import")
    ctx.update_params(sd_model=rt.sd.model_id)
    files = {
        name: store.get_file(ctx.connection, concept_id, UPLOAD_PREFIX + name) for name in (EMBEDDINGS_FILE, KV_FILE)
    }
    try:
        concept = Concept.from_files(files, record["identifier"], record["class_word"])
        check_concept(rt.sd, concept)
    except (ConceptFileError, ConceptMismatchError, ValueError) as exc:
        raise JobFailure("invalid_concept", str(exc)) from None
    save_concept(ctx, concept_id, concept, method="custom_diffusion" if concept.kv else "textual_inversion")
    for name in (EMBEDDINGS_FILE, KV_FILE):
        store.drop_file(ctx.connection, concept_id, UPLOAD_PREFIX + name)
    return {
        "concept_id": concept_id,
        "identifier": record["identifier"],
        "vectors": int(concept.vectors.shape[0]),
        "random_weights": rt.sd.random_weights,
    }


@job_function("referring")
def segment_referring(ctx: JobContext, payload: dict) -> dict:
    rt = runtime.current()
    params = dict(payload["params"])
    queries = params.pop("queries")
    concepts = load_concepts(ctx, payload.get("concepts", {}))
    ctx.update_params(sd_model=rt.sd.model_id)
    image = fetch_image(ctx, payload["image"])
    try:
        out = run_referring(
            rt.sd, image, params.pop("class_word"), queries, concepts=concepts, report=ctx.report, **params
        )
    except PromptTooLongError as exc:
        raise JobFailure("prompt_too_long", str(exc)) from None
    started = time.perf_counter()
    count = len(queries) + out.instances + 1
    names = ["background", *queries] + [None] * out.instances
    ids = [0, *range(1, len(queries) + 1)] + [None] * out.instances
    scores = [None] * count
    for label, score in out.scores.items():
        scores[label] = score
    segments = segments_from_labels(out.labels, names, ids, scores)
    return finish(
        ctx,
        payload["image"],
        segments,
        timings(out.timings_ms, started),
        labels=["background", *queries],
        instances=out.instances,
        instance_scores=out.instance_scores,
    )
