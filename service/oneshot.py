"""One-shot (SLiMe) models as the API sees them: records shown with their training job's state, and
the checks on training examples made before anything is stored."""

from __future__ import annotations

import numpy as np

from attnseg import oneshot_store
from attnseg.ownership import owned_by
from attnseg.settings import Settings
from service.errors import ApiError
from service.records import with_job_state
from service.schemas import shown_id, valid_id
from service.submissions import part_name
from service.submit import checked_mask
from service.uploads import CheckedImage, check_image, decode_mask

Upload = tuple[str, bytes]  # (file name, content)


def model_view(connection, record: dict, settings: Settings) -> dict:
    """The stored record, with a training that ended without the worker saying so shown as failed."""
    view = {**record, "labels": ["background", *record["labels"]], "progress": None}
    view["name"] = record.get("name") or ", ".join(record["labels"])  # unnamed (and older) models
    view.setdefault("description", None)
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


def check_example_count(images: list[Upload], masks: list[Upload]) -> None:
    """422 unless there is at least one image and exactly one mask per image."""
    if not images:
        raise ApiError(422, "invalid_field", "at least one file in `images` is required", field="images")
    if len(images) != len(masks):
        raise ApiError(
            422,
            "invalid_field",
            f"{len(images)} images but {len(masks)} masks: give one mask per image, in the same order",
            field="masks",
        )


def check_pair(
    index: int, image_file: Upload, mask_file: Upload, labels: list[str], settings: Settings
) -> tuple[CheckedImage, CheckedImage, set[int]]:
    """One pair decoded and checked at a time: memory stays that of the largest picture."""
    image_field, mask_field = part_name("images", index, image_file[0]), part_name("masks", index, mask_file[0])
    image = check_image(image_file[1], max_pixels=settings.max_image_pixels, field=image_field)
    mask = decode_mask(mask_file[1], max_pixels=settings.max_image_pixels, field=mask_field)
    classes = check_mask(mask, image, len(labels) + 1, mask_field)
    return image, checked_mask(mask), classes


def check_examples(
    images: list[Upload], masks: list[Upload], labels: list[str], settings: Settings
) -> list[tuple[CheckedImage, CheckedImage]]:
    """The (image, mask) pairs checked; 422 also when a part in `labels` has no pixel in any mask."""
    pairs, present = [], set()  # class ids seen over all masks
    for index, (image_file, mask_file) in enumerate(zip(images, masks)):
        image, mask, classes = check_pair(index, image_file, mask_file, labels, settings)
        pairs.append((image, mask))
        present.update(classes)
    unused = [f"{name!r} (id {index})" for index, name in enumerate(labels, start=1) if index not in present]
    if unused:
        raise ApiError(
            422,
            "invalid_mask",
            f"no mask has a pixel of part {', '.join(unused)}: every part in "
            "`labels` needs pixels in at least one mask to be learned",
            field="labels",
        )
    return pairs
