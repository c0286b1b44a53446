"""One-shot part segmentation (SLiMe): train from annotated images, then segment new ones."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from attnseg import oneshot_store
from attnseg.ownership import owned_by
from attnseg.record_store import new_id
from attnseg.settings import Settings
from service.deps import current_tenant, get_redis, get_settings
from service.errors import ApiError, error_responses
from service.records import cancel_job, with_job_state
from service.schemas import (
    MAX_OFFSET,
    Job,
    OneshotModel,
    OneshotModelList,
    OneshotSegmentParams,
    TrainParams,
    shown_id,
    valid_id,
)
from service.submissions import openapi_body, part_name, read_submission, validate_params
from service.submit import checked_mask, image_entry, submit_job
from service.uploads import CheckedImage, check_image, decode_mask

router = APIRouter(prefix="/oneshot", tags=["oneshot"])
TRAIN_ERRORS = error_responses(400, 401, 413, 415, 422, 429, 503)
SEGMENT_ERRORS = error_responses(400, 401, 404, 409, 413, 415, 422, 429, 503)


def check_mask(mask: np.ndarray, image: CheckedImage, num_classes: int, field: str) -> set[int]:
    """The class ids present; each error names the file and the problem (nothing is stored before all pass)."""
    if mask.shape != (image.height, image.width):
        raise ApiError(
            422,
            "invalid_mask",
            f"{field} is {mask.shape[1]}x{mask.shape[0]} but its image is "
            f"{image.width}x{image.height}; a mask must have its image's size",
            field=field,
        )
    values = np.unique(mask)
    outside = values[(values < 0) | (values >= num_classes)]
    if outside.size:
        raise ApiError(
            422,
            "invalid_mask",
            f"{field} has class ids {outside[:8].tolist()} but `labels` names "
            f"{num_classes - 1} parts: ids must be 0 (background) to "
            f"{num_classes - 1}",
            field=field,
        )
    if not (values > 0).any():
        raise ApiError(422, "invalid_mask", f"{field} has no part pixel (all background)", field=field)
    return {int(value) for value in values}


def model_view(connection, record: dict, settings: Settings) -> dict:
    """The stored record, with a training that ended without the worker saying so shown as failed."""
    view = {**record, "labels": ["background", *record["labels"]], "progress": None}
    view.pop("artefact", None)  # the vectors stay in Redis; workers read them
    if record["status"] == "training":
        with_job_state(connection, view, record["train_job_id"], settings)
    return view


def get_record(connection, model_id: str, tenant: str) -> dict:
    """The tenant's model; 404 for an unknown id and for another tenant's (existence is not revealed)."""
    record = oneshot_store.get(connection, model_id) if valid_id(model_id) else None
    if not owned_by(record, tenant):
        raise ApiError(404, "not_found", f"no one-shot model with id '{shown_id(model_id)}'", field="model_id")
    return record


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
    tenant: str = Depends(current_tenant),
    settings: Settings = Depends(get_settings),
    connection=Depends(get_redis),
):
    """`images[i]` with `masks[i]` (a PNG of class ids, 0 = background, same size), `labels` naming ids 1..K-1.

    Answers 202 with the training job and its `model_id` at once; the model is usable when ready
    (segment jobs submitted earlier wait for it).
    """
    submission = await read_submission(request, TrainParams, ("images", "masks"))
    params = validate_params(TrainParams, submission.fields)
    images, masks = submission.files.get("images", []), submission.files.get("masks", [])
    if not images:
        raise ApiError(422, "invalid_field", "at least one file in `images` is required", field="images")
    if len(images) != len(masks):
        raise ApiError(
            422,
            "invalid_field",
            f"{len(images)} images but {len(masks)} masks: give one mask per image, in the same order",
            field="masks",
        )

    def check_pair(index: int, image_file: tuple[str, bytes], mask_file: tuple[str, bytes]):
        """One pair decoded and checked at a time: memory stays that of the largest picture."""
        image_field, mask_field = part_name("images", index, image_file[0]), part_name("masks", index, mask_file[0])
        image = check_image(image_file[1], max_pixels=settings.max_image_pixels, field=image_field)
        mask = decode_mask(mask_file[1], max_pixels=settings.max_image_pixels, field=mask_field)
        classes = check_mask(mask, image, len(params.labels) + 1, mask_field)
        return image, checked_mask(mask), classes

    def check_and_submit():
        pairs, present = [], set()  # class ids seen over all masks
        for index, (image_file, mask_file) in enumerate(zip(images, masks)):
            image, mask, classes = check_pair(index, image_file, mask_file)
            pairs.append((image, mask))
            present.update(classes)
        unused = [f"{name!r} (id {index})" for index, name in enumerate(params.labels, start=1) if index not in present]
        if unused:
            raise ApiError(
                422,
                "invalid_mask",
                f"no mask has a pixel of part {', '.join(unused)}: every part in "
                "`labels` needs pixels in at least one mask to be learned",
                field="labels",
            )
        model_id, job_id = oneshot_store.new_model_id(), new_id()

        def store():
            entries = [
                {"image": image_entry(connection, image, settings), "mask": image_entry(connection, mask, settings)}
                for image, mask in pairs
            ]
            oneshot_store.create(
                connection,
                model_id,
                tenant=tenant,
                labels=params.labels,
                params=params.model_dump(),
                train_job_id=job_id,
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
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
    limit: int = Query(50, ge=1, le=500),
    tenant: str = Depends(current_tenant),
    settings: Settings = Depends(get_settings),
    connection=Depends(get_redis),
):
    """Your models, newest first."""
    ids = oneshot_store.list_ids(connection, tenant, offset=offset, limit=limit)
    records = [oneshot_store.get(connection, i) for i in ids]
    return {
        "models": [model_view(connection, r, settings) for r in records if owned_by(r, tenant)],
        "total": oneshot_store.count(connection, tenant),
    }


@router.get("/{model_id}", response_model=OneshotModel, responses=error_responses(401, 404, 422, 503))
def get_model(
    model_id: str,
    tenant: str = Depends(current_tenant),
    settings: Settings = Depends(get_settings),
    connection=Depends(get_redis),
):
    return model_view(connection, get_record(connection, model_id, tenant), settings)


@router.delete("/{model_id}", status_code=204, response_class=Response, responses=error_responses(401, 404, 422, 503))
def delete_model(
    model_id: str,
    tenant: str = Depends(current_tenant),
    settings: Settings = Depends(get_settings),
    connection=Depends(get_redis),
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
    openapi_extra=openapi_body(OneshotSegmentParams, {"image": False}),
    summary="Segment an image into a one-shot model's parts",
)
async def segment(
    model_id: str,
    request: Request,
    response: Response,
    tenant: str = Depends(current_tenant),
    settings: Settings = Depends(get_settings),
    connection=Depends(get_redis),
):
    """One segment per part present, named by the model's labels. Allowed while the model trains."""
    submission = await read_submission(request, OneshotSegmentParams, ("image",))
    params = validate_params(OneshotSegmentParams, submission.fields)
    data = submission.one_file("image")

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
        image = check_image(data, max_pixels=settings.max_image_pixels)
        after = view["train_job_id"] if view["status"] == "training" else None
        return submit_job(
            connection,
            settings,
            response,
            tenant,
            "oneshot_segment",
            lambda: {"model_id": model_id, "image": image_entry(connection, image, settings), "params": filled},
            after=after,
            extra_meta={"model_id": model_id},
        )

    return await run_in_threadpool(check_and_submit)
