"""Checking uploaded pictures before anything is stored: format from the bytes, pixel cap from the
header, a full decode for integrity, a pixel mode that has an RGB form, EXIF orientation."""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from attnseg.images import HIGH_DEPTH_GREY, PILLOW_TO_RGB, sniff_format, upright_size
from service.errors import ApiError


@dataclass(frozen=True)
class CheckedImage:
    """An upload that passed every check; `width`/`height` are after EXIF orientation."""

    data: bytes
    width: int
    height: int


def decoder_message(exc: Exception) -> str:
    # Pillow names its file object ("<_io.BytesIO object at 0x...>"): meaningless to a client.
    return re.sub(r"\s*<_io\.\w+ object at 0x[0-9a-fA-F]+>", "", str(exc)).strip() or type(exc).__name__


@contextmanager
def decoder_errors(field: str, fmt: str, max_pixels: int) -> Iterator[None]:
    """Pillow's errors while opening or decoding an upload, as the API's."""
    try:
        with warnings.catch_warnings():
            # Our own cap is the one that applies; Pillow's bomb warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except Image.DecompressionBombError:
        raise ApiError(
            413, "image_too_large", f"{field} declares more pixels than the limit of {max_pixels}", field=field
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ApiError(
            400, "invalid_image", f"{field} could not be decoded as {fmt}: {decoder_message(exc)}", field=field
        ) from None


def open_checked(
    data: bytes, *, max_pixels: int, field: str, formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP"), pixels: bool = True
) -> tuple[Image.Image, tuple[int, int]]:
    """Bytes -> the fully decoded image in its stored mode (orientation not applied) and its upright
    (width, height).

    The pixel count is checked from the header before any pixel is decoded, so a small file that
    declares a huge canvas (a decompression bomb) costs nothing. pixels=False: the caller only needs
    the decode to succeed, and a JPEG is decoded at 1/8 scale (libjpeg's DCT scaling): every block
    of the bitstream is still read and entropy-decoded, so a truncated or broken file fails the
    same way, at about half the cost (a 12 MP photo: 30 ms instead of 60).
    """
    if not data:
        raise ApiError(422, "invalid_field", f"{field} is empty", field=field)
    fmt = sniff_format(data)
    if fmt not in formats:
        names = " or ".join("WebP" if f == "WEBP" else f for f in formats)
        raise ApiError(
            415, "unsupported_media_type", f"{field} is not a {names} image (detected from its bytes)", field=field
        )
    with decoder_errors(field, fmt, max_pixels):
        image = Image.open(io.BytesIO(data), formats=[fmt])
        width, height = image.size
        if width * height > max_pixels:
            raise ApiError(
                413,
                "image_too_large",
                f"{field} is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels",
                field=field,
            )
        upright = upright_size(image)
        if not pixels and fmt == "JPEG":
            image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
        image.load()
    return image, upright


def check_image(data: bytes, *, max_pixels: int, field: str = "image") -> CheckedImage:
    """Everything a worker will need to decode the upload, checked; the pixels are dropped again."""
    image, (width, height) = open_checked(data, max_pixels=max_pixels, field=field, pixels=False)
    if image.mode not in PILLOW_TO_RGB | HIGH_DEPTH_GREY:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"{field} has pixel mode {image.mode!r}, which has no 8-bit RGB form; send an RGB or greyscale picture",
            field=field,
        )
    return CheckedImage(data, width, height)


def decode_mask(data: bytes, *, max_pixels: int, field: str) -> np.ndarray:
    """A label mask PNG -> (H, W) class ids, in the PNG's own integer type (uint8, uint16, int32 or bool).

    Accepted: 8/16-bit grey, palette PNGs (the palette index is the class id, as in VOC), 1-bit,
    and RGB(A) whose channels are all equal. Colour-coded masks are refused with an explanation.
    """
    image = ImageOps.exif_transpose(open_checked(data, max_pixels=max_pixels, field=field, formats=("PNG",))[0])
    if image.mode in ("RGB", "RGBA"):
        pixels = np.asarray(image)[..., :3]
        if not (np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2])):
            raise ApiError(
                422,
                "invalid_mask",
                f"{field} is a colour image; send a single-channel PNG whose pixel "
                "values are class ids (0 = background)",
                field=field,
            )
        return pixels[..., 0]
    if image.mode in ("LA", "PA"):
        image = image.getchannel(0)
    return np.asarray(image)
