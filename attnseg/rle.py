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


COLUMNS_AT_ONCE = 256  # sampled columns looked up together: bounds the index arrays to a few MB


def decode_sampled(rle: dict, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """{"size": [H, W], "counts"} -> the mask at pixels rows x cols only, (len(rows), len(cols)) bool.

    rows and cols are pixel indexes (in [0, H) and [0, W)); the full (H, W) mask is never built:
    each sampled pixel's run is found by binary search in the runs' ends, so a picture reduced for
    display costs its own size, not the original's.
    """
    h, w = rle["size"]
    counts = rle["counts"]
    ends = np.cumsum(string_to_counts(counts) if isinstance(counts, str) else counts, dtype=np.int64)
    if (ends[-1] if ends.size else 0) != h * w:
        raise ValueError(f"RLE covers {ends[-1] if ends.size else 0} pixels, size says {h * w}")
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    out = np.empty((rows.size, cols.size), dtype=bool)
    for start in range(0, cols.size, COLUMNS_AT_ONCE):
        block = cols[start : start + COLUMNS_AT_ONCE]
        positions = block[None, :] * h + rows[:, None]  # column-major flat index of each sample
        out[:, start : start + block.size] = np.searchsorted(ends, positions, side="right") % 2 == 1
    return out


def bbox(mask: np.ndarray) -> list[int]:
    """(H, W) bool -> [x, y, w, h] of the tight box (COCO xywh), zeros for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return [0, 0, 0, 0]
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def counts_to_strings(counts: np.ndarray, offsets: np.ndarray) -> list[str]:
    """Many count lists at once -> their compressed strings, as `counts_to_string` on each.

    counts: (N,) int64, the lists laid end to end; offsets: (M + 1,) where list m is
    counts[offsets[m]:offsets[m + 1]]. Every count becomes its 5-bit groups in one pass over a
    (N, groups) table, so the cost does not depend on how many lists there are.
    """
    counts = np.asarray(counts, dtype=np.int64)
    index = np.arange(counts.size) - np.repeat(offsets[:-1], np.diff(offsets))  # position in its list
    deltas = counts.copy()
    later = index > 2
    deltas[later] -= counts[np.flatnonzero(later) - 2]
    shifts = 5 * np.arange(14, dtype=np.int64)  # 14 groups hold any int64 delta
    groups = (deltas[:, None] >> shifts) & 0x1F
    rest = deltas[:, None] >> (shifts + 5)
    more = np.where(groups & 0x10, rest != -1, rest != 0)
    used = np.argmin(more, axis=1) + 1  # groups up to and including the first with no continuation
    keep = np.arange(shifts.size) < used[:, None]
    data = ((groups | np.where(more, 0x20, 0)) + 48)[keep].astype(np.uint8).tobytes()
    ends = np.concatenate(([0], np.cumsum(used)))[offsets]
    return [data[a:b].decode("ascii") for a, b in zip(ends[:-1].tolist(), ends[1:].tolist())]


def label_map_to_segments(labels: np.ndarray) -> list[tuple[int, dict, int, list[int]]]:
    """(H, W) int label map -> [(label, rle, area, bbox)] for each label present, ascending.

    One pass over the map in column-major order finds its runs of equal labels; each label's
    mask RLE is its runs with the gaps between them, so no per-label mask is ever built.
    """
    h, w = labels.shape
    if labels.size == 0:
        return []
    low, high = int(labels.min()), int(labels.max())
    narrow = np.min_scalar_type(high) if low >= 0 else np.int64  # fewer bytes to scan
    flat = labels.T.astype(narrow, order="C").ravel()  # column-major order
    starts = np.concatenate(([0], np.flatnonzero(flat[1:] != flat[:-1]) + 1))
    ends = np.concatenate((starts[1:], [flat.size]))
    values = flat[starts]
    order = np.argsort(values, kind="stable")  # runs grouped by label, in pixel order within one
    starts, ends, values = starts[order], ends[order], values[order]
    present, first = np.unique(values, return_index=True)
    group_ends = np.concatenate((first[1:], [values.size]))
    runs = group_ends - first

    # Per label: [gap before its first run, run, gap, run, ..., run, gap to the end]; a zero gap
    # at the end is dropped, as pycocotools never writes a trailing zero run.
    previous_end = np.where(np.arange(values.size) == np.repeat(first, runs), 0, np.roll(ends, 1))
    gaps = starts - previous_end
    tail = h * w - ends[group_ends - 1]
    sizes = 2 * runs + (tail > 0)
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    counts = np.empty(offsets[-1], dtype=np.int64)
    slot = offsets[:-1].repeat(runs) + 2 * (np.arange(values.size) - np.repeat(first, runs))
    counts[slot] = gaps
    counts[slot + 1] = ends - starts
    counts[offsets[1:][tail > 0] - 1] = tail[tail > 0]
    strings = counts_to_strings(counts, offsets)

    areas = np.add.reduceat(ends - starts, first)
    # A run inside one column spans its rows; one crossing columns touches the first and last row.
    col_start, col_end = starts // h, (ends - 1) // h
    one_column = col_start == col_end
    row_low = np.where(one_column, starts % h, 0)
    row_high = np.where(one_column, (ends - 1) % h, h - 1)
    x0, x1 = np.minimum.reduceat(col_start, first), np.maximum.reduceat(col_end, first)
    y0, y1 = np.minimum.reduceat(row_low, first), np.maximum.reduceat(row_high, first)
    return [
        (
            int(value),
            {"size": [int(h), int(w)], "counts": string},
            int(area),
            [int(a), int(b), int(c - a + 1), int(d - b + 1)],
        )
        for value, string, area, a, b, c, d in zip(present, strings, areas, x0, y0, x1, y1)
    ]
