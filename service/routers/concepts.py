"""Concepts: identifiers learned from a few photos (Custom Diffusion, Textual Inversion) or imported
from the files the diffusers training scripts write; used as `<identifier>` in text queries."""

from __future__ import annotations

import uuid
from contextlib import contextmanager

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from attnseg import concept_store
from attnseg.concept_files import (
    EMBEDDINGS_FILE,
    KV_FILE,
    ConceptFileError,
    check_embedding_shape,
    check_kv_shapes,
    embedding_key,
    identifiers_in,
    kv_layers,
)
from attnseg.concept_store import UPLOAD_PREFIX, IdentifierTakenError, store
from attnseg.settings import Settings
from attnseg.tensor_files import TensorFileError, declared_shapes
from attnseg.workers_registry import ready_workers
from service.deps import current_tenant, get_redis, get_settings
from service.errors import ApiError, error_responses
from service.records import cancel_job, with_job_state
from service.schemas import (
    MAX_OFFSET,
    Concept,
    ConceptImportParams,
    ConceptList,
    ConceptTrainParams,
    Job,
    shown_id,
    valid_id,
)
from service.submissions import openapi_body, read_submission, validate_params
from service.submit import checked_mask, image_entry, submit_job
from service.uploads import check_image, decode_mask

router = APIRouter(prefix="/concepts", tags=["concepts"])
SUBMIT_ERRORS = error_responses(400, 401, 409, 413, 415, 422, 429, 503)
RECORD_ERRORS = error_responses(401, 404, 422, 503)
MIN_PHOTOS, MAX_PHOTOS = 3, 20
IN_THE_MAKING = ("training", "importing")


def concept_view(connection, record: dict, settings: Settings) -> dict:
    view = {**record, "progress": None, "files": [f for f in record["files"] if not f.startswith(UPLOAD_PREFIX)]}
    if record["status"] in IN_THE_MAKING:
        with_job_state(connection, view, record["job_id"], settings)
    return view


def get_record(connection, concept_id: str, tenant: str) -> dict:
    """The tenant's concept; 404 for an unknown id and for another tenant's (existence is not revealed)."""
    record = store.get(connection, concept_id, owner=tenant) if valid_id(concept_id) else None
    if record is None:
        raise ApiError(404, "not_found", f"no concept with id '{shown_id(concept_id)}'", field="concept_id")
    return record


def create_record(connection, concept_id: str, owner: str, identifier: str, class_word: str, **fields) -> dict:
    try:
        return concept_store.create(
            connection, concept_id, owner=owner, identifier=identifier, class_word=class_word, **fields
        )
    except IdentifierTakenError as exc:
        raise ApiError(
            409, "identifier_taken", f"{exc}; delete it or choose another identifier", field="identifier"
        ) from None


def resolve_concepts(
    connection, owner: str, texts: list[str], settings: Settings, field: str, *, one_pass: bool = False
) -> tuple[dict[str, str], str | None]:
    """identifier -> concept id for every `<identifier>` in texts, and the training job to wait for
    (a concept still training may be used: the job then waits for it). 422 for an unknown
    identifier, or with one_pass (all texts in one UNet pass) for two Custom Diffusion concepts, whose
    attention weights would replace the same projections; 409 for a failed concept or for two
    concepts still in the making."""
    found: dict[str, str] = {}
    waiting: list[str] = []
    weighted: list[str] = []
    for identifier in dict.fromkeys(name for text in texts for name in identifiers_in(text)):
        record = concept_store.by_identifier(connection, owner, identifier)
        if record is None:
            raise ApiError(
                422,
                "unknown_concept",
                f"<{identifier}> is not a concept of yours: train or import it "
                "first (POST /concepts/train, /concepts/import)",
                field=field,
            )
        view = concept_view(connection, record, settings)
        if view["status"] == "failed":
            raise ApiError(
                409,
                "concept_failed",
                f"concept <{identifier}> failed: {(view['error'] or {}).get('message', 'unknown error')}",
                field=field,
            )
        if view["status"] in IN_THE_MAKING:
            waiting.append(record["job_id"])
        if record["method"] == "custom_diffusion":
            weighted.append(f"<{identifier}>")
        found[identifier] = record["id"]
    if one_pass and len(weighted) > 1:
        raise ApiError(
            422,
            "invalid_field",
            f"{', '.join(weighted)} are Custom Diffusion concepts: one request can "
            "use only one of them (Textual Inversion concepts combine freely)",
            field=field,
        )
    if len(waiting) > 1:
        raise ApiError(
            409,
            "concepts_not_ready",
            "more than one of these concepts is still being made; wait for them (GET /concepts/{id})",
            field=field,
        )
    return found, (waiting[0] if waiting else None)


def announced_shapes(connection) -> tuple[dict, str] | None:
    """The concept shapes (and model) a ready worker announced, or None when no worker is up."""
    for worker in ready_workers(connection):
        if worker.get("concept_shapes"):
            return worker["concept_shapes"], worker["sd_model"]
    return None


def precheck_files(connection, identifier: str, embeddings: bytes, weights: bytes | None) -> None:
    """Check the uploads from their headers, here, before anything is queued (attnseg.tensor_files):
    a malformed or oversized file, and a safetensors file whose contents or shapes do not fit a ready
    worker's model, are 422s. A torch zip's tensors are in its pickle: the worker checks those."""
    expected = announced_shapes(connection)
    with refused_as("embeddings"):
        embedding_shapes = declared_shapes(embeddings)
        if embedding_shapes is not None:
            shape = embedding_shapes[embedding_key(embedding_shapes, identifier)]
            if expected is not None:
                check_embedding_shape(shape, *expected)
    if weights is None:
        return
    with refused_as("weights"):
        weight_shapes = declared_shapes(weights)
        if weight_shapes is not None:
            kv = kv_layers(weight_shapes)
            if expected is not None:
                check_kv_shapes(kv, *expected)


@contextmanager
def refused_as(field: str):
    """A ConceptFileError or TensorFileError inside becomes a 422 naming the file's field."""
    try:
        yield
    except (ConceptFileError, TensorFileError) as exc:
        raise ApiError(422, "invalid_concept", str(exc), field=field) from None


@router.post(
    "/train",
    status_code=202,
    response_model=Job,
    responses=SUBMIT_ERRORS,
    openapi_extra=openapi_body(ConceptTrainParams, {"images": True, "masks": True}),
    summary="Learn a concept from 3 to 20 photos of one object",
)
async def train(
    request: Request,
    response: Response,
    tenant: str = Depends(current_tenant),
    settings: Settings = Depends(get_settings),
    connection=Depends(get_redis),
):
    """`images`: photos of the object; `masks` (optional, one per photo, non-zero = the object) weight
    the loss to it. Answers 202 with the training job and its `concept_id`."""
    submission = await read_submission(request, ConceptTrainParams, ("images", "masks"))
    params = validate_params(ConceptTrainParams, submission.fields)
    images, masks = submission.files.get("images", []), submission.files.get("masks", [])
    if not MIN_PHOTOS <= len(images) <= MAX_PHOTOS:
        raise ApiError(
            422,
            "invalid_field",
            f"give {MIN_PHOTOS} to {MAX_PHOTOS} photos in `images`, got {len(images)}",
            field="images",
        )
    if masks and len(masks) != len(images):
        raise ApiError(
            422,
            "invalid_field",
            f"{len(images)} images but {len(masks)} masks: give one mask per image, in the same order, or none",
            field="masks",
        )

    def check_and_submit():
        photos = [
            check_image(data, max_pixels=settings.max_image_pixels, field=f"images[{i}] ({name})")
            for i, (name, data) in enumerate(images)
        ]
        object_masks = []
        for index, ((name, data), photo) in enumerate(zip(masks, photos)):  # one decoded mask at a time
            field = f"masks[{index}] ({name})"
            mask = decode_mask(data, max_pixels=settings.max_image_pixels, field=field) > 0
            if mask.shape != (photo.height, photo.width) or not mask.any():
                raise ApiError(
                    422,
                    "invalid_mask",
                    f"{field} must have its photo's size {photo.width}x{photo.height} "
                    "and some object pixels (non-zero)",
                    field=field,
                )
            object_masks.append(checked_mask(mask.view("uint8") * 255))
        concept_id, job_id = concept_store.new_concept_id(), uuid.uuid4().hex
        method = "custom_diffusion" if params.train_kv else "textual_inversion"

        def store_record_and_pictures():
            create_record(
                connection,
                concept_id,
                tenant,
                params.identifier,
                params.class_word,
                method=method,
                status="training",
                params=params.model_dump(),
                job_id=job_id,
            )
            return {
                "concept_id": concept_id,
                "photos": [image_entry(connection, p, settings) for p in photos],
                "masks": [image_entry(connection, m, settings) for m in object_masks] or None,
                "params": {**params.model_dump(), "concept_id": concept_id},
            }

        return submit_job(
            connection,
            settings,
            response,
            tenant,
            "concept_train",
            store_record_and_pictures,
            job_id=job_id,
            extra_meta={"concept_id": concept_id},
        )

    return await run_in_threadpool(check_and_submit)


@router.post(
    "/import",
    status_code=202,
    response_model=Job,
    responses=SUBMIT_ERRORS,
    openapi_extra=openapi_body(ConceptImportParams, {"embeddings": False, "weights": False}),
    summary="Import a concept trained elsewhere (diffusers Textual Inversion / Custom Diffusion files)",
)
async def import_concept(
    request: Request,
    response: Response,
    tenant: str = Depends(current_tenant),
    settings: Settings = Depends(get_settings),
    connection=Depends(get_redis),
):
    """`embeddings`: `learned_embeds.safetensors` (or `.bin`, or Custom Diffusion's `<new1>.bin`);
    `weights` (optional): `pytorch_custom_diffusion_weights.bin` or `.safetensors`. The worker reads
    them (never unpickling code) and checks them against its model; safetensors files are checked
    here too when a worker is up (422 on a mismatch)."""
    submission = await read_submission(request, ConceptImportParams, ("embeddings", "weights"))
    params = validate_params(ConceptImportParams, submission.fields)
    embeddings = submission.one_file("embeddings")
    weight_files = submission.files.get("weights", [])
    if len(weight_files) > 1:
        raise ApiError(422, "invalid_field", "at most one `weights` file", field="weights")
    weights = weight_files[0][1] if weight_files else None

    def check_and_submit():
        precheck_files(connection, params.identifier, embeddings, weights)
        concept_id, job_id = concept_store.new_concept_id(), uuid.uuid4().hex

        def store_record_and_files():
            create_record(
                connection,
                concept_id,
                tenant,
                params.identifier,
                params.class_word,
                method="custom_diffusion" if weights else "textual_inversion",
                status="importing",
                params=params.model_dump(),
                job_id=job_id,
            )
            store.put_file(connection, concept_id, UPLOAD_PREFIX + EMBEDDINGS_FILE, embeddings)
            if weights:
                store.put_file(connection, concept_id, UPLOAD_PREFIX + KV_FILE, weights)
            return {"concept_id": concept_id, "params": {**params.model_dump(), "concept_id": concept_id}}

        return submit_job(
            connection,
            settings,
            response,
            tenant,
            "concept_import",
            store_record_and_files,
            job_id=job_id,
            extra_meta={"concept_id": concept_id},
        )

    return await run_in_threadpool(check_and_submit)


@router.get("", response_model=ConceptList, responses=error_responses(401, 422, 503))
def list_concepts(
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
    limit: int = Query(50, ge=1, le=500),
    tenant: str = Depends(current_tenant),
    settings: Settings = Depends(get_settings),
    connection=Depends(get_redis),
):
    """Your concepts, newest first."""
    ids = store.list_ids(connection, owner=tenant, offset=offset, limit=limit)
    records = [store.get(connection, i, owner=tenant) for i in ids]
    return {
        "concepts": [concept_view(connection, r, settings) for r in records if r is not None],
        "total": store.count(connection, owner=tenant),
    }


@router.get("/{concept_id}", response_model=Concept, responses=RECORD_ERRORS)
def get_concept(
    concept_id: str,
    tenant: str = Depends(current_tenant),
    settings: Settings = Depends(get_settings),
    connection=Depends(get_redis),
):
    return concept_view(connection, get_record(connection, concept_id, tenant), settings)


@router.get(
    "/{concept_id}/files/{name}",
    response_class=Response,
    responses={**RECORD_ERRORS, 200: {"content": {"application/octet-stream": {}}}},
    summary="Export a ready concept's diffusers file",
)
def export_file(concept_id: str, name: str, tenant: str = Depends(current_tenant), connection=Depends(get_redis)):
    """`learned_embeds.safetensors` ({"<identifier>": (n, D)}) and, for Custom Diffusion,
    `pytorch_custom_diffusion_weights.safetensors`: load them with diffusers' `load_textual_inversion`
    and `unet.load_attn_procs`, or import them again."""
    record = get_record(connection, concept_id, tenant)
    if name.startswith(UPLOAD_PREFIX) or name not in record["files"]:
        raise ApiError(
            404,
            "not_found",
            f"concept {concept_id} has no file {shown_id(name)!r}; it has {record['files']} "
            f"(status {record['status']})",
            field="name",
        )
    data = store.get_file(connection, concept_id, name)
    return Response(
        data, media_type="application/octet-stream", headers={"Content-Disposition": f'attachment; filename="{name}"'}
    )


@router.delete("/{concept_id}", status_code=204, response_class=Response, responses=RECORD_ERRORS)
def delete_concept(
    concept_id: str,
    tenant: str = Depends(current_tenant),
    settings: Settings = Depends(get_settings),
    connection=Depends(get_redis),
):
    """Deletes the concept and its files; a training still under way is canceled."""
    record = get_record(connection, concept_id, tenant)
    if record["status"] in IN_THE_MAKING:
        cancel_job(connection, record["job_id"], settings)
    concept_store.delete(connection, concept_id)
    return Response(status_code=204)
