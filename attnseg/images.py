"""Normalised images and label masks in Redis, by content hash: the API stores, workers read.

An image is stored once as lossless PNG (fast compression) under the SHA-256 of its pixels, mode
and size, so identical uploads share one key whatever their original encoding. Images are RGB;
label masks are single-channel 8-bit (class ids).
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image

from attnseg.queue import image_key


class ImageMissingError(LookupError):
    """The image key has expired or never existed."""


def store_image(connection, image: Image.Image, ttl_s: int) -> str:
    """Store an RGB or L (mask) PIL image; returns its Redis key. Refreshes the TTL of an existing copy."""
    if image.mode not in ("RGB", "L"):
        raise ValueError(f"store RGB images or L masks, not {image.mode}")
    pixels = np.asarray(image)
    header = f"{image.mode}:{image.width}x{image.height}:".encode()
    key = image_key(hashlib.sha256(header + pixels.tobytes()).hexdigest())
    if not connection.expire(key, ttl_s):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        connection.set(key, buffer.getvalue(), ex=ttl_s)
    return key


def load_image(connection, key: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB for an image, (H, W) uint8 for a mask; ImageMissingError when gone."""
    data = connection.get(key)
    if data is None:
        raise ImageMissingError(f"the uploaded image {key} has expired; upload it again")
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image)  # writable: torch.from_numpy warns on read-only arrays
