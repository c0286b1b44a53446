"""Normalised images in Redis, by content hash: the API stores them, workers read them.

An image is stored once as lossless PNG (fast compression) under the SHA-256 of its RGB pixels
and size, so identical uploads share one key whatever their original encoding.
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
    """Store an RGB PIL image; returns its Redis key. Refreshes the TTL of an existing copy."""
    rgb = np.asarray(image.convert("RGB"))
    digest = hashlib.sha256(f"{rgb.shape[1]}x{rgb.shape[0]}:".encode() + rgb.tobytes()).hexdigest()
    key = image_key(digest)
    if not connection.expire(key, ttl_s):
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
        connection.set(key, buffer.getvalue(), ex=ttl_s)
    return key


def load_image(connection, key: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB; raises ImageMissingError when the key is gone."""
    data = connection.get(key)
    if data is None:
        raise ImageMissingError(f"the uploaded image {key} has expired; upload it again")
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))
