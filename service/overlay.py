"""Drawing segments over their image: a translucent fill per segment, outlines and labels.

The drawing is made at most `max_side` pixels on its longer side, whatever the picture's size:
the picture is decoded at a reduced scale where its format allows it (JPEG) and reduced at once
otherwise, and each mask is read from its RLE only at the drawing's pixels (`rle.decode_sampled`),
so a small upload of a huge flat picture never becomes full-size float canvases and masks.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from attnseg import rle
from attnseg.images import decode_rgb

ALPHA = 0.45


def palette(n: int) -> np.ndarray:
    """n distinct colours (golden-angle hues), (n, 3) uint8."""
    hues = (np.arange(n) * 0.61803398875) % 1.0
    image = Image.fromarray(
        (np.stack([hues * 255, np.full(n, 200), np.full(n, 235)], -1)[None]).astype(np.uint8), mode="HSV"
    )
    return np.asarray(image.convert("RGB"))[0]


def drawing_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled down to fit max_side on the longer side (never enlarged), each >= 1."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def nearest_pixels(size: int, cells: int) -> np.ndarray:
    """(cells,) int64: the original pixel under the centre of each of `cells` equal cells over `size`."""
    return (2 * np.arange(cells, dtype=np.int64) + 1) * size // (2 * cells)


def picture_at(data: bytes, width: int, height: int) -> np.ndarray:
    """Stored picture bytes -> (height, width, 3) uint8, decoded no larger than the format needs."""
    image = decode_rgb(data, min_side=min(width, height))
    if image.shape[:2] != (height, width):
        image = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
    return image


def render_overlay(picture: bytes, size: tuple[int, int], segments: list[dict], max_side: int) -> bytes:
    """Stored picture bytes of upright `size` (width, height) + API segments -> PNG bytes of the
    drawing, at most max_side on its longer side."""
    width, height = size
    out_w, out_h = drawing_size(width, height, max_side)
    rows, cols = nearest_pixels(height, out_h), nearest_pixels(width, out_w)
    canvas = picture_at(picture, out_w, out_h).astype(np.float32)
    colours = palette(len(segments))
    edges = np.zeros((out_h, out_w), dtype=bool)
    for colour, segment in zip(colours, segments):
        mask = rle.decode_sampled(segment["segmentation"], rows, cols)
        canvas[mask] = (1 - ALPHA) * canvas[mask] + ALPHA * colour
        inner = mask.copy()
        inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
        edges |= mask & ~inner
    canvas[edges] = 255
    out = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for colour, segment in zip(colours, segments):
        x, y = segment["bbox"][:2]
        text = segment.get("label") or f"#{segment['id']}"
        at = (x * out_w / width + 3, y * out_h / height + 3)
        draw.text(at, text, fill=(255, 255, 255), stroke_width=2, stroke_fill=tuple(int(c) for c in colour))
    buffer = io.BytesIO()
    out.save(buffer, format="PNG")
    return buffer.getvalue()
