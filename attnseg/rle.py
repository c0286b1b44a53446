"""COCO run-length encoding of binary masks, byte-compatible with pycocotools.

Counts are run lengths over the mask in column-major (Fortran) order, starting with a run of
zeros. The compressed string form follows pycocotools' `rleToString`: each count (minus the
count two places earlier, from the fourth on) is written as 5-bit groups, low bits first, with
0x20 marking "more groups follow", each group offset by 48 into printable ASCII.
"""

from __future__ import annotations

import numpy as np


def mask_to_counts(mask: np.ndarray) -> list[int]:
    """(H, W) bool -> run lengths in column-major order, first run counts zeros."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat[0] else runs


def counts_to_string(counts: list[int]) -> str:
    out = bytearray()
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        while True:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append((c | 0x20 if more else c) + 48)
            if not more:
                break
    return out.decode("ascii")


def string_to_counts(s: str) -> list[int]:
    counts: list[int] = []
    data = s.encode("ascii")
    p = 0
    while p < len(data):
        x = 0
        k = 0
        while True:
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            p += 1
            k += 1
            if not c & 0x20:
                if c & 0x10:
                    x |= -1 << (5 * k)
                break
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def encode(mask: np.ndarray) -> dict:
    """(H, W) bool -> {"size": [H, W], "counts": ascii str}, as pycocotools.mask.encode."""
    h, w = mask.shape
    return {"size": [int(h), int(w)], "counts": counts_to_string(mask_to_counts(mask))}


def decode(rle: dict) -> np.ndarray:
    """{"size": [H, W], "counts": str | list} -> (H, W) bool."""
    h, w = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = string_to_counts(counts)
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    if flat.size != h * w:
        raise ValueError(f"RLE covers {flat.size} pixels, size says {h * w}")
    return flat.reshape((h, w), order="F")


def bbox(mask: np.ndarray) -> list[int]:
    """(H, W) bool -> [x, y, w, h] of the tight box (COCO xywh), zeros for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return [0, 0, 0, 0]
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def label_map_to_segments(labels: np.ndarray) -> list[tuple[int, dict, int, list[int]]]:
    """(H, W) int label map -> [(label, rle, area, bbox)] for each label present, ascending."""
    segments = []
    for value in np.unique(labels):
        mask = labels == value
        segments.append((int(value), encode(mask), int(mask.sum()), bbox(mask)))
    return segments
