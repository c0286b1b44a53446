"""What a caller may pass as a picture or a mask, turned into a multipart file part.

A picture is a path, file bytes, a PIL image, or a uint8 numpy array ((H, W) grey or (H, W, 3)
RGB); a segment call also takes a `StoredPicture` (`Result.picture`), sent as its id, not its
bytes. A mask is the same, with numpy arrays of class ids ((H, W), any integer or bool dtype,
values 0..255). Arrays and PIL images are sent as PNG (lossless); files and bytes as they are (the
API detects the format from the bytes).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ImageInput = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray
FilePart = tuple[str, bytes, str]  # (filename, content, content type), as httpx takes it
FieldPart = tuple[None, str]  # a multipart text field (no filename), as httpx takes it


@dataclass(frozen=True)
class StoredPicture:
    """A picture the API already holds, by the id a result gave it (`Result.picture`): asking about
    it again sends the id, and the worker may reuse what it computed from the picture."""

    id: str


PictureInput = ImageInput | StoredPicture


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_array(array: np.ndarray) -> Image.Image:
    """(H, W) or (H, W, 3) uint8 -> PIL image; anything else is refused with what was given."""
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise TypeError(f"a picture array must be uint8 (H, W) or (H, W, 3); got {array.dtype} {array.shape}")
    return Image.fromarray(np.ascontiguousarray(array))


def mask_array(array: np.ndarray) -> Image.Image:
    """(H, W) class ids (integers 0..255 or bool) -> a greyscale PIL image of those ids."""
    if array.ndim != 2 or not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise TypeError(f"a mask array must be (H, W) integer class ids; got {array.dtype} {array.shape}")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"mask class ids must be 0..255; got {array.min()}..{array.max()}")
    return Image.fromarray(array.astype(np.uint8))


def file_part(value: ImageInput, name: str, *, mask: bool = False) -> FilePart:
    """One picture (or mask) -> (filename, bytes, content type); `name` is used when there is no file name."""
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        return path.name, path.read_bytes(), "application/octet-stream"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return name, bytes(value), "application/octet-stream"
    if isinstance(value, np.ndarray):
        value = mask_array(value) if mask else image_array(value)
    if isinstance(value, Image.Image):
        return f"{name}.png", png_bytes(value), "image/png"
    raise TypeError(f"expected a path, bytes, a PIL image or a numpy array; got {type(value).__name__}")


def picture_part(value: PictureInput) -> tuple[str, FilePart | FieldPart]:
    """A segment call's picture as its multipart entry: the `image` file, or the `image_id` field."""
    if isinstance(value, StoredPicture):
        return "image_id", (None, value.id)
    return "image", file_part(value, "image")
