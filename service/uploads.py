"""Decoding uploaded images safely: format from the bytes, pixel cap before decoding, EXIF, RGB."""

from __future__ import annotations

import io
import warnings

import numpy as np

from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import ApiError

def sniff_format(data: bytes) -> str | None:
    """The format from the magic bytes, whatever the declared content type says."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def open_image(data: bytes, *, max_pixels: int, field: str = "image") -> Image.Image:
    """Bytes -> a fully decoded image in its stored mode, EXIF orientation applied.

    The pixel count is checked from the header before any pixel is decoded, so a small file that
    declares a huge canvas (a decompression bomb) costs nothing.
    """
    if not data:
        raise ApiError(422, "invalid_field", f"{field} is empty", field=field)
    fmt = sniff_format(data)
    if fmt is None:
        raise ApiError(415, "unsupported_media_type",
                       f"{field} is not a JPEG, PNG or WebP image (detected from its bytes)", field=field)
    try:
        with warnings.catch_warnings():
            # Our own cap below is the one that applies; Pillow's bomb warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = image.size
            if width * height > max_pixels:
                raise ApiError(413, "image_too_large",
                               f"{field} is {width}x{height} = {width * height} pixels; the limit is "
                               f"{max_pixels} pixels", field=field)
            image.load()
    except ApiError:
        raise
    except Image.DecompressionBombError:
        raise ApiError(413, "image_too_large", f"{field} declares more pixels than the limit of {max_pixels}",
                       field=field) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ApiError(400, "invalid_image", f"{field} could not be decoded as {fmt}: {exc}", field=field) from None
    return ImageOps.exif_transpose(image)


def decode_rgb(data: bytes, *, max_pixels: int, field: str = "image") -> Image.Image:
    return open_image(data, max_pixels=max_pixels, field=field).convert("RGB")


def decode_mask(data: bytes, *, max_pixels: int, field: str) -> np.ndarray:
    """A label mask PNG -> (H, W) int64 class ids.

    Accepted: 8/16-bit grey, palette PNGs (the palette index is the class id, as in VOC), 1-bit,
    and RGB(A) whose channels are all equal. Colour-coded masks are refused with an explanation.
    """
    if sniff_format(data) != "PNG":
        raise ApiError(415, "unsupported_media_type", f"{field} must be a PNG whose pixel values are class ids",
                       field=field)
    image = open_image(data, max_pixels=max_pixels, field=field)
    if image.mode in ("RGB", "RGBA"):
        pixels = np.asarray(image)[..., :3]
        if not (np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2])):
            raise ApiError(422, "invalid_mask", f"{field} is a colour image; send a single-channel PNG whose pixel "
                                                "values are class ids (0 = background)", field=field)
        return pixels[..., 0].astype(np.int64)
    if image.mode == "LA":
        image = image.getchannel("L")
    return np.asarray(image).astype(np.int64)
