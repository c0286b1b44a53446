"""Concepts: identifiers learned from a few photos (Custom Diffusion, Textual Inversion) or imported
from the files the diffusers training scripts write; used as `<identifier>` in text queries."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

import service.paths  # noqa: F401 - registers the `id` path convertor
from attnseg import concept_store
from attnseg.concept_files import EMBEDDINGS_FILE, KV_FILE
from attnseg.concept_store import UPLOAD_PREFIX, store
from attnseg.record_store import new_id
from service.concepts import (
    IN_THE_MAKING,
    check_object_masks,
    check_photo_count,
    check_photos,
    concept_view,
    create_record,
    get_record,
    precheck_files,
)
from service.deps import LimitQuery, OffsetQuery, RedisDep, SettingsDep, TenantDep
from service.errors import ApiError, error_responses
from service.records import cancel_job
from service.schemas import Concept, ConceptImportParams, ConceptList, ConceptTrainParams, Job, shown_id
from service.submissions import openapi_body, read_submission, validate_params
from service.submit import image_entry, submit_job

router = APIRouter(prefix="/concepts", tags=["concepts"])
SUBMIT_ERRORS = error_responses(400, 401, 409, 413, 415, 422, 429, 503)
RECORD_ERRORS = error_responses(401, 404, 422, 503)


@router.post(
    "/train",
    status_code=202,
    response_model=Job,
    responses=SUBMIT_ERRORS,
    openapi_extra=openapi_body(ConceptTrainParams, {"images": True, "masks": True}, optional=("masks",)),
    summary="Learn a concept from 3 to 20 photos of one object",
)
async def train(
    request: Request,
    response: Response,
    tenant: TenantDep,
    settings: SettingsDep,
    connection: RedisDep,
):
    """`images`: photos of the object; `masks` (optional, one per photo, non-zero = the object) weight
    the loss to it. Answers 202 with the training job and its `concept_id`."""
    submission = await read_submission(request, ConceptTrainParams, ("images", "masks"))
    params = validate_params(ConceptTrainParams, submission.fields)
    images, masks = submission.files.get("images", []), submission.files.get("masks", [])
    check_photo_count(images, masks)

    def check_and_submit():
        photos = check_photos(images, settings)
        object_masks = check_object_masks(masks, photos, settings)
        concept_id, job_id = concept_store.new_concept_id(), new_id()
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
                name=params.name,
                description=params.description,
            )
            return {
                "concept_id": concept_id,
                "photos": [image_entry(connection, p, settings, tenant) for p in photos],
                "masks": [image_entry(connection, m, settings, tenant) for m in object_masks] or None,
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
    openapi_extra=openapi_body(ConceptImportParams, {"embeddings": False, "weights": False}, optional=("weights",)),
    summary="Import a concept trained elsewhere (diffusers Textual Inversion / Custom Diffusion files)",
)
async def import_concept(
    request: Request,
    response: Response,
    tenant: TenantDep,
    settings: SettingsDep,
    connection: RedisDep,
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
        concept_id, job_id = concept_store.new_concept_id(), new_id()

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
                name=params.name,
                description=params.description,
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
    tenant: TenantDep,
    settings: SettingsDep,
    connection: RedisDep,
    offset: OffsetQuery = 0,
    limit: LimitQuery = 50,
):
    """Your concepts, newest first."""
    ids = store.list_ids(connection, owner=tenant, offset=offset, limit=limit)
    records = [store.get(connection, i, owner=tenant) for i in ids]
    return {
        "concepts": [concept_view(connection, r, settings) for r in records if r is not None],
        "total": store.count(connection, owner=tenant),
    }


@router.get("/{concept_id:id}", response_model=Concept, responses=RECORD_ERRORS)
def get_concept(
    concept_id: str,
    tenant: TenantDep,
    settings: SettingsDep,
    connection: RedisDep,
):
    return concept_view(connection, get_record(connection, concept_id, tenant), settings)


@router.get(
    "/{concept_id:id}/files/{name}",
    response_class=Response,
    responses={**RECORD_ERRORS, 200: {"content": {"application/octet-stream": {}}}},
    summary="Export a ready concept's diffusers file",
)
def export_file(concept_id: str, name: str, tenant: TenantDep, connection: RedisDep):
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


@router.delete("/{concept_id:id}", status_code=204, response_class=Response, responses=RECORD_ERRORS)
def delete_concept(
    concept_id: str,
    tenant: TenantDep,
    settings: SettingsDep,
    connection: RedisDep,
):
    """Deletes the concept and its files; a training still under way is canceled."""
    record = get_record(connection, concept_id, tenant)
    if record["status"] in IN_THE_MAKING:
        cancel_job(connection, record["job_id"], settings)
    concept_store.delete(connection, concept_id)
    return Response(status_code=204)
