"""One-shot part segmentation (SLiMe): train from annotated images, then segment new ones."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

import service.paths  # noqa: F401 - registers the `id` path convertor
from attnseg import oneshot_store
from attnseg.ownership import owned_by
from attnseg.record_store import new_id
from service.deps import LimitQuery, OffsetQuery, RedisDep, SettingsDep, TenantDep
from service.errors import ApiError, error_responses
from service.oneshot import check_example_count, check_examples, get_record, model_view
from service.pictures import checked_picture, picture_source
from service.records import cancel_job
from service.schemas import (
    Job,
    OneshotModel,
    OneshotModelList,
    OneshotSegmentParams,
    TrainParams,
)
from service.submissions import openapi_body, read_submission, validate_params
from service.submit import image_entry, submit_job

router = APIRouter(prefix="/oneshot", tags=["oneshot"])
TRAIN_ERRORS = error_responses(400, 401, 413, 415, 422, 429, 503)
SEGMENT_ERRORS = error_responses(400, 401, 404, 409, 413, 415, 422, 429, 503)


@router.post(
    "/train",
    status_code=202,
    response_model=Job,
    responses=TRAIN_ERRORS,
    openapi_extra=openapi_body(TrainParams, {"images": True, "masks": True}),
    summary="Train a one-shot part model (SLiMe) from images and label masks",
)
async def train(
    request: Request,
    response: Response,
    tenant: TenantDep,
    settings: SettingsDep,
    connection: RedisDep,
):
    """`images[i]` with `masks[i]` (a PNG of class ids, 0 = background, same size), `labels` naming ids 1..K-1.

    Answers 202 with the training job and its `model_id` at once; the model is usable when ready
    (segment jobs submitted earlier wait for it).
    """
    submission = await read_submission(request, TrainParams, ("images", "masks"))
    params = validate_params(TrainParams, submission.fields)
    images, masks = submission.files.get("images", []), submission.files.get("masks", [])
    check_example_count(images, masks)

    def check_and_submit():
        pairs = check_examples(images, masks, params.labels, settings)
        model_id, job_id = oneshot_store.new_model_id(), new_id()

        def store():
            entries = [
                {
                    "image": image_entry(connection, image, settings, tenant),
                    "mask": image_entry(connection, mask, settings, tenant),
                }
                for image, mask in pairs
            ]
            oneshot_store.create(
                connection,
                model_id,
                tenant=tenant,
                labels=params.labels,
                params=params.model_dump(),
                train_job_id=job_id,
                name=params.name,
                description=params.description,
            )
            return {"model_id": model_id, "examples": entries, "params": {**params.model_dump(), "model_id": model_id}}

        return submit_job(
            connection,
            settings,
            response,
            tenant,
            "oneshot_train",
            store,
            job_id=job_id,
            extra_meta={"model_id": model_id},
        )

    return await run_in_threadpool(check_and_submit)


@router.get("", response_model=OneshotModelList, responses=error_responses(401, 422, 503))
def list_models(
    tenant: TenantDep,
    settings: SettingsDep,
    connection: RedisDep,
    offset: OffsetQuery = 0,
    limit: LimitQuery = 50,
):
    """Your models, newest first."""
    ids = oneshot_store.list_ids(connection, tenant, offset=offset, limit=limit)
    records = [oneshot_store.get(connection, i) for i in ids]
    return {
        "models": [model_view(connection, r, settings) for r in records if owned_by(r, tenant)],
        "total": oneshot_store.count(connection, tenant),
    }


@router.get("/{model_id:id}", response_model=OneshotModel, responses=error_responses(401, 404, 422, 503))
def get_model(
    model_id: str,
    tenant: TenantDep,
    settings: SettingsDep,
    connection: RedisDep,
):
    return model_view(connection, get_record(connection, model_id, tenant), settings)


@router.delete(
    "/{model_id:id}", status_code=204, response_class=Response, responses=error_responses(401, 404, 422, 503)
)
def delete_model(
    model_id: str,
    tenant: TenantDep,
    settings: SettingsDep,
    connection: RedisDep,
):
    """Deletes the model; a training still under way is canceled. Segment jobs waiting for it fail."""
    record = get_record(connection, model_id, tenant)
    if record["status"] == "training":
        cancel_job(connection, record["train_job_id"], settings)
    oneshot_store.delete(connection, model_id)
    return Response(status_code=204)


@router.post(
    "/{model_id}/segment",
    status_code=202,
    response_model=Job,
    responses=SEGMENT_ERRORS,
    openapi_extra=openapi_body(OneshotSegmentParams, {"image": False}, by_id="image"),
    summary="Segment an image into a one-shot model's parts",
)
async def segment(
    model_id: str,
    request: Request,
    response: Response,
    tenant: TenantDep,
    settings: SettingsDep,
    connection: RedisDep,
):
    """One segment per part present, named by the model's labels. Allowed while the model trains."""
    submission = await read_submission(request, OneshotSegmentParams, ("image",))
    source = picture_source(submission)  # before the fields are checked: it takes `image_id` out
    params = validate_params(OneshotSegmentParams, submission.fields)

    def check_and_submit():
        view = model_view(connection, get_record(connection, model_id, tenant), settings)
        if view["status"] == "failed":
            raise ApiError(
                409,
                "model_failed",
                f"model {model_id} failed training: {(view['error'] or {}).get('message', 'unknown error')}",
            )
        filled = {
            **params.model_dump(),
            "model_id": model_id,
            "crops_per_side": params.crops_per_side or view["params"]["crops_per_side"],
            "resolution": params.resolution or view["params"]["resolution"],
        }
        image = checked_picture(connection, source, settings, tenant)
        after = view["train_job_id"] if view["status"] == "training" else None
        return submit_job(
            connection,
            settings,
            response,
            tenant,
            "oneshot_segment",
            lambda: {"model_id": model_id, "image": image_entry(connection, image, settings, tenant), "params": filled},
            after=after,
            extra_meta={"model_id": model_id},
        )

    return await run_in_threadpool(check_and_submit)
