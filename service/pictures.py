"""A segmentation request's picture: uploaded with it, or named by the id an earlier result gave
(`image.id`), so that a second question about the same picture sends no bytes again."""

from __future__ import annotations

import re
from dataclasses import dataclass

from attnseg.queue import image_key
from attnseg.settings import Settings
from service.errors import ApiError
from service.schemas import shown_id
from service.submissions import Submission
from service.uploads import CheckedImage, check_image

PICTURE_ID = re.compile(r"[0-9a-f]{64}")  # SHA-256 hex, as `attnseg.images.picture_id` gives it


@dataclass(frozen=True)
class PictureSource:
    """Exactly one of: the uploaded bytes, or the id of a picture the tenant stored earlier."""

    data: bytes | None = None
    picture_id: str | None = None


def picture_source(submission: Submission) -> PictureSource:
    """The request's `image` file or its `image_id` field (taken out of the fields); 422 unless exactly one."""
    picture_id = submission.fields.pop("image_id", None)
    if picture_id is None:
        return PictureSource(data=submission.one_file("image"))
    if not isinstance(picture_id, str):
        raise ApiError(
            422, "invalid_field", "image_id must be a string: an earlier result's image.id", field="image_id"
        )
    if submission.files.get("image"):
        raise ApiError(422, "invalid_field", "send an image file or an image_id, not both", field="image_id")
    return PictureSource(picture_id=picture_id)


def checked_picture(connection, source: PictureSource, settings: Settings, tenant: str) -> CheckedImage:
    """The picture checked as any upload is; a stored one is read from the tenant's own pictures
    (404 when it has expired or is not theirs; storing it again for the job extends its TTL)."""
    data = source.data if source.picture_id is None else stored_picture(connection, tenant, source.picture_id)
    return check_image(data, max_pixels=settings.max_image_pixels)


def stored_picture(connection, tenant: str, picture_id: str) -> bytes:
    data = connection.get(image_key(tenant, picture_id)) if PICTURE_ID.fullmatch(picture_id) else None
    if data is None:
        raise ApiError(
            404,
            "not_found",
            f"no picture with id '{shown_id(picture_id)}' (pictures are kept for a limited time: upload it again)",
            field="image_id",
        )
    return data
