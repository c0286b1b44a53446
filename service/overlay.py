"""Drawing segments over their image: a translucent fill per segment, outlines and labels."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from attnseg import rle

ALPHA = 0.45


def palette(n: int) -> np.ndarray:
    """n distinct colours (golden-angle hues), (n, 3) uint8."""
    hues = (np.arange(n) * 0.61803398875) % 1.0
    image = Image.fromarray(
        (np.stack([hues * 255, np.full(n, 200), np.full(n, 235)], -1)[None]).astype(np.uint8), mode="HSV"
    )
    return np.asarray(image.convert("RGB"))[0]


def render_overlay(image: np.ndarray, segments: list[dict]) -> bytes:
    """(H, W, 3) uint8 + API segments -> PNG bytes."""
    canvas = image.astype(np.float32)
    colours = palette(len(segments))
    edges = np.zeros(image.shape[:2], dtype=bool)
    for colour, segment in zip(colours, segments):
        mask = rle.decode(segment["segmentation"])
        canvas[mask] = (1 - ALPHA) * canvas[mask] + ALPHA * colour
        inner = mask.copy()
        inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
        edges |= mask & ~inner
    canvas[edges] = 255
    out = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for colour, segment in zip(colours, segments):
        x, y, w, h = segment["bbox"]
        text = segment.get("label") or f"#{segment['id']}"
        draw.text((x + 3, y + 3), text, fill=(255, 255, 255), stroke_width=2, stroke_fill=tuple(int(c) for c in colour))
    buffer = io.BytesIO()
    out.save(buffer, format="PNG")
    return buffer.getvalue()
