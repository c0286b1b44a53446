"""Pictures in Redis, by owner and content hash: the API checks and stores, workers decode.

A photo is stored as the bytes it was received in (JPEG, PNG or WebP, already checked by the API:
format, pixel cap, a full decode), under its owner (tenant) and the SHA-256 of those bytes, so one
tenant's identical uploads share one key and another tenant's never do: no tenant extends, shortens
or learns of another's pictures. A stored copy's TTL is only ever lengthened. Both sides decode it
with `decode_rgb`: EXIF orientation applied, any mode Pillow opens turned into 8-bit RGB (16-bit
grey scaled, not clipped). A worker may decode straight to a smaller working size (`min_side`: JPEG
draft mode, then `Image.reduce`); the job payload carries the upright width/height, so masks still
come back at the original size. Label masks are stored normalised: single-channel 8-bit PNG of
class ids.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image, ImageOps

from attnseg.queue import image_key

FORMATS = ("JPEG", "PNG", "WEBP")
# Modes Pillow converts to RGB without losing meaning (alpha is dropped, as for RGBA).
PILLOW_TO_RGB = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
# Grey deeper than 8 bits: Pillow's own conversion clips at 255, so scale the 16-bit range instead.
HIGH_DEPTH_GREY = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


class ImageMissingError(LookupError):
    """The image key has expired or never existed."""


class UnsupportedModeError(ValueError):
    """A picture whose pixel mode has no faithful 8-bit RGB form."""

    def __init__(self, mode: str):
        super().__init__(f"pixel mode {mode!r} cannot be converted to 8-bit RGB")
        self.mode = mode


def sniff_format(data: bytes) -> str | None:
    """The format from the magic bytes, whatever the declared content type says."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def grey_to_8bit(image: Image.Image) -> Image.Image:
    """A 16/32-bit grey image -> mode L, 0..65535 mapped linearly onto 0..255 (a gradient stays one)."""
    pixels = np.asarray(image, dtype=np.int64)
    return Image.fromarray(((np.clip(pixels, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any decoded picture -> 8-bit RGB; UnsupportedModeError for modes without a faithful form."""
    if image.mode in HIGH_DEPTH_GREY:
        image = grey_to_8bit(image)
    elif image.mode not in PILLOW_TO_RGB:
        raise UnsupportedModeError(image.mode)
    if image.mode == "RGB":
        return image  # convert() would return a full copy
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow's documented path for palette transparency
    return image.convert("RGB")


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after EXIF orientation, read from the header (no decoding)."""
    width, height = image.size
    orientation = image.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def decode_rgb(data: bytes, *, min_side: int | None = None) -> np.ndarray:
    """Stored picture bytes -> (H, W, 3) uint8 RGB, upright.

    min_side: decode no smaller than this on the shorter side, but as small as the format allows
    above it (JPEG DCT scaling, then integer `reduce`): a worker needs only its working size.
    """
    with Image.open(io.BytesIO(data), formats=FORMATS) as image:
        if min_side is not None and image.format == "JPEG":
            width, height = image.size
            shorter = min(width, height)
            image.draft("RGB", (max(1, width * min_side // shorter), max(1, height * min_side // shorter)))
        image = to_rgb(image)  # before `reduce`, which refuses palette, 1-bit and 16-bit modes
        if min_side is not None and min(image.size) // min_side >= 2:
            image = image.reduce(min(image.size) // min_side)
        # writable: torch.from_numpy warns on read-only arrays
        return np.array(ImageOps.exif_transpose(image))


def content_key(owner: str, data: bytes) -> str:
    return image_key(owner, hashlib.sha256(data).hexdigest())


def picture_id(key: str) -> str:
    """A stored picture's id as clients see it (`image.id`): the SHA-256 hex of its bytes, the key's tail."""
    return key.rsplit(":", 1)[1]


def store_bytes(connection, owner: str, data: bytes, ttl_s: int) -> str:
    """Store checked picture bytes of `owner`; returns the Redis key. An existing copy is kept, its
    TTL raised to ttl_s if it was shorter (never shortened: a finished job keeps its picture longer)."""
    key = content_key(owner, data)
    if not connection.expire(key, ttl_s, gt=True):  # 0: no such key, or it already lives longer
        connection.set(key, data, ex=ttl_s, nx=True)
    return key


def mask_png(mask: np.ndarray) -> bytes:
    """(H, W) uint8 class ids -> PNG bytes (fast compression: masks are mostly flat)."""
    buffer = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def fetch(connection, key: str) -> bytes:
    data = connection.get(key)
    if data is None:
        raise ImageMissingError(f"the uploaded image {key} has expired; upload it again")
    return data


def load_image(connection, key: str, *, min_side: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a stored picture; ImageMissingError when gone."""
    return decode_rgb(fetch(connection, key), min_side=min_side)


def load_mask(connection, key: str) -> np.ndarray:
    """(H, W) uint8 class ids of a stored label mask; ImageMissingError when gone."""
    with Image.open(io.BytesIO(fetch(connection, key)), formats=["PNG"]) as image:
        return np.array(image)
