"""POST /segment/unsupervised (DiffSeg), /segment/text (class names), /segment/referring (instances)."""

from __future__ import annotations

import redis
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from attnseg.settings import Settings
from service.concepts import require_selfcross, resolve_concepts
from service.deps import RedisDep, SettingsDep, TenantDep
from service.errors import error_responses
from service.pictures import checked_picture, picture_source
from service.schemas import Job, Params, ReferringParams, TextParams, UnsupervisedParams
from service.submissions import openapi_body, read_submission, validate_params
from service.submit import image_entry, submit_job

router = APIRouter(prefix="/segment", tags=["segment"])

SUBMIT_ERRORS = error_responses(400, 401, 404, 413, 415, 422, 429, 503)  # 404: an image_id not found
CONCEPT_SUBMIT_ERRORS = error_responses(400, 401, 404, 409, 413, 415, 422, 429, 503)  # 409: a concept not ready


@router.post(
    "/unsupervised",
    status_code=202,
    response_model=Job,
    responses=SUBMIT_ERRORS,
    openapi_extra=openapi_body(UnsupervisedParams, {"image": False}, by_id="image"),
    summary="Segment an image without a prompt (DiffSeg)",
)
async def segment_unsupervised(
    request: Request,
    response: Response,
    tenant: TenantDep,
    settings: SettingsDep,
    connection: RedisDep,
):
    """Segments the whole image into regions by merging self-attention maps (KL distance).

    Answers 202 with the job; poll `GET /jobs/{id}`. Pass `vocabulary` to name the segments.
    """
    return await submit_one_image(request, response, tenant, settings, connection, UnsupervisedParams, "unsupervised")


@router.post(
    "/text",
    status_code=202,
    response_model=Job,
    responses=CONCEPT_SUBMIT_ERRORS,
    openapi_extra=openapi_body(TextParams, {"image": False}, by_id="image"),
    summary="Segment an image into the given classes",
)
async def segment_text(
    request: Request,
    response: Response,
    tenant: TenantDep,
    settings: SettingsDep,
    connection: RedisDep,
):
    """One segment per class found, plus background (`label_id` 0); `labels` lists every class asked for.

    Methods: `selfcross` (default), `gem`, `gem_refined`, `cluster`. A class may name a concept
    (`"<my-mug> mug"`, selfcross only). Answers 202 with the job.
    """
    return await submit_one_image(
        request, response, tenant, settings, connection, TextParams, "text", concept_field="classes"
    )


@router.post(
    "/referring",
    status_code=202,
    response_model=Job,
    responses=CONCEPT_SUBMIT_ERRORS,
    openapi_extra=openapi_body(ReferringParams, {"image": False}, by_id="image"),
    summary="Find the instance each query refers to (personalized referring segmentation)",
)
async def segment_referring(
    request: Request,
    response: Response,
    tenant: TenantDep,
    settings: SettingsDep,
    connection: RedisDep,
):
    """Separates the instances of `class_word` and gives each query its instance: one segment per
    query found (`label` the query, `score` its mean attribution), plus the other instances unlabelled.
    Queries may name concepts: `"<my-mug> mug"`, `"a <my-mug> mug with cola"`, `"a red mug"`."""
    return await submit_one_image(
        request,
        response,
        tenant,
        settings,
        connection,
        ReferringParams,
        "referring",
        concept_field="queries",
    )


async def submit_one_image(
    request: Request,
    response: Response,
    tenant: str,
    settings: Settings,
    connection: redis.Redis,
    model: type[Params],
    kind: str,
    *,
    concept_field: str | None = None,
):
    """concept_field: the parameter whose texts may name concepts, resolved to the caller's concepts."""
    submission = await read_submission(request, model, ("image",))
    source = picture_source(submission)  # before the fields are checked: it takes `image_id` out
    params = validate_params(model, submission.fields)

    def check_and_submit():
        concepts, after = (
            ({}, None)
            if concept_field is None
            else resolve_concepts(
                connection, tenant, getattr(params, concept_field), settings, concept_field, one_pass=kind == "text"
            )
        )
        require_selfcross(concepts, params)
        image = checked_picture(connection, source, settings, tenant)
        return submit_job(
            connection,
            settings,
            response,
            tenant,
            kind,
            lambda: {
                "image": image_entry(connection, image, settings, tenant),
                "params": params.model_dump(),
                "concepts": concepts,
            },
            after=after,
        )

    return await run_in_threadpool(check_and_submit)
