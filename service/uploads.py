"""Decoding uploaded images safely: format from the bytes, pixel cap before decoding, EXIF, RGB."""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import ApiError

ACCEPTED_FORMATS = {"JPEG", "PNG", "WEBP"}


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
