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


CHUNK_PIXELS = 1 << 18  # pixels per encoding step: bounds its arrays to a few MB, whatever the map


def compress_counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N,) int64 counts, already as deltas -> (bytes as uint8, (N,) bytes per value).

    A value takes the fewest 5-bit groups that hold it as a signed number (pycocotools stops when
    what is left is the sign extension of the last group's top bit), all but the last with 0x20.
    """
    magnitude = values ^ (values >> 63)  # ~value for negative values, the value otherwise
    used = np.ones(values.size, dtype=np.int64)
    limit, largest = 16, int(magnitude.max(initial=0))
    while limit <= largest:  # one more group per 5 bits beyond the first group's 4 and sign
        used += magnitude >= limit
        limit <<= 5
    first = np.cumsum(used) - used
    data = np.empty(int(first[-1] + used[-1]) if values.size else 0, dtype=np.uint8)
    data[first] = (values & 0x1F) + (used > 1) * 0x20 + 48
    for group in range(1, int(used.max(initial=0))):
        sel = np.flatnonzero(used > group)
        bits5 = (values[sel] >> (5 * group)) & 0x1F
        data[first[sel] + group] = bits5 + (used[sel] > group + 1) * 0x20 + 48
    return data, used


class _LabelEncoder:
    """Per-label state while the runs of a label map arrive in column-major order, chunk by chunk.

    Each label's counts are [gap, run, gap, run, ...] (gap: pixels since its previous run), turned
    into pycocotools' delta form as they come, so only the compressed bytes are kept.
    """

    def __init__(self, h: int, w: int):
        self.h, self.size = h, h * w
        self.slots: dict[int, int] = {}
        self.parts: list[list[bytes]] = []
        # per slot: end of its last run, its last two counts, counts written, area, box
        self.state = np.zeros((0, 9), dtype=np.int64)

    def _slots_of(self, present: np.ndarray) -> np.ndarray:
        for value in present.tolist():
            if value not in self.slots:
                self.slots[value] = len(self.parts)
                self.parts.append([])
                fresh = [0, 0, 0, 0, 0, self.size, -1, self.h, -1]  # box starts empty
                self.state = np.vstack((self.state, np.array([fresh], dtype=np.int64)))
        return np.array([self.slots[v] for v in present.tolist()], dtype=np.int64)

    def add(self, starts: np.ndarray, ends: np.ndarray, values: np.ndarray) -> None:
        """(R,) complete runs in pixel order: their start, end (exclusive) and label."""
        order = np.argsort(values, kind="stable")  # runs grouped by label, in pixel order within one
        starts, ends, values = starts[order], ends[order], values[order]
        first = np.concatenate(([0], np.flatnonzero(values[1:] != values[:-1]) + 1))
        present = values[first].astype(np.int64)
        slots = self._slots_of(present)
        runs = np.diff(np.append(first, values.size))
        group = np.repeat(np.arange(present.size), runs)
        state = self.state[slots]
        opens = np.arange(values.size) == first[group]
        gaps = starts - np.where(opens, state[group, 0], np.roll(ends, 1))

        # Each label's counts behind its two previous ones, so deltas need no special case here.
        offsets = np.concatenate(([0], np.cumsum(2 * runs + 2)))
        counts = np.empty(offsets[-1], dtype=np.int64)
        counts[offsets[:-1]], counts[offsets[:-1] + 1] = state[:, 2], state[:, 1]
        at = offsets[:-1][group] + 2 + 2 * (np.arange(values.size) - first[group])
        counts[at], counts[at + 1] = gaps, ends - starts
        deltas = counts - np.roll(counts, 2)
        for i in np.flatnonzero(state[:, 3] <= 2).tolist():  # a list's first three counts stay whole
            head = offsets[i] + 2 + np.arange(min(3 - state[i, 3], 2 * runs[i]))
            deltas[head] = counts[head]
        real = np.ones(counts.size, dtype=bool)
        real[offsets[:-1]] = real[offsets[:-1] + 1] = False
        deltas = deltas[real]
        self._append(slots, deltas, 2 * runs)

        # A run inside one column spans its rows; one crossing columns touches the first and last row.
        col_start, row_low = np.divmod(starts, self.h)
        col_end, row_high = np.divmod(ends - 1, self.h)
        crossing = col_start != col_end
        row_low[crossing], row_high[crossing] = 0, self.h - 1
        state[:, 0] = ends[first + runs - 1]
        state[:, 1], state[:, 2] = counts[offsets[1:] - 1], counts[offsets[1:] - 2]
        state[:, 3] += 2 * runs
        state[:, 4] += np.add.reduceat(ends - starts, first)
        state[:, 5] = np.minimum(state[:, 5], col_start[first])  # runs of a label come in pixel order
        state[:, 6] = col_end[first + runs - 1]
        state[:, 7] = np.minimum(state[:, 7], np.minimum.reduceat(row_low, first))
        state[:, 8] = np.maximum(state[:, 8], np.maximum.reduceat(row_high, first))
        self.state[slots] = state

    def _append(self, slots: np.ndarray, deltas: np.ndarray, lengths: np.ndarray) -> None:
        data, used = compress_counts(deltas)
        ends = np.cumsum(used)[np.cumsum(lengths) - 1]
        for slot, a, b in zip(slots.tolist(), np.append(0, ends[:-1]).tolist(), ends.tolist()):
            self.parts[slot].append(data[a:b].tobytes())

    def finish(self) -> list[tuple[int, dict, int, list[int]]]:
        """Close every label with its gap to the end (none when zero, as pycocotools)."""
        state = self.state
        tail = self.size - state[:, 0]
        closing = np.flatnonzero(tail > 0)
        deltas = np.where(state[closing, 3] > 2, tail[closing] - state[closing, 2], tail[closing])
        if closing.size:
            self._append(closing, deltas, np.ones(closing.size, dtype=np.int64))
        h, w = self.h, self.size // self.h
        return [
            (
                value,
                {"size": [h, w], "counts": b"".join(self.parts[slot]).decode("ascii")},
                int(state[slot, 4]),
                [
                    int(state[slot, 5]),
                    int(state[slot, 7]),
                    int(state[slot, 6] - state[slot, 5] + 1),
                    int(state[slot, 8] - state[slot, 7] + 1),
                ],
            )
            for value, slot in sorted(self.slots.items())
        ]


def narrow_dtype(low: int, high: int) -> np.dtype:
    """The narrowest integer type that holds every value in [low, high] (uint8 for 0..255)."""
    if low >= 0:
        return np.min_scalar_type(high)
    return np.result_type(np.min_scalar_type(low), np.min_scalar_type(-abs(high) - 1))  # signed, holds high


def column_chunks(labels: np.ndarray):
    """(H, W) int -> its values in column-major order, (<= CHUNK_PIXELS,) narrow-int arrays."""
    h, w = labels.shape
    narrow = narrow_dtype(int(labels.min()), int(labels.max()))  # fewer bytes to scan
    step = max(1, CHUNK_PIXELS // h)
    for c in range(0, w, step):
        yield labels[:, c : c + step].T.astype(narrow, order="C").ravel()


def label_map_to_segments(labels: np.ndarray) -> list[tuple[int, dict, int, list[int]]]:
    """(H, W) int label map -> [(label, rle, area, bbox)] for each label present, ascending.

    Runs of equal labels are found chunk by chunk in column-major order; each label's mask RLE is
    its runs with the gaps between them, so no per-label mask is built and memory stays bounded
    by the chunk size plus the compressed output.
    """
    h, w = labels.shape
    if labels.size == 0:
        return []
    encoder = _LabelEncoder(h, w)
    offset, pending_start, pending_value = 0, 0, None  # the run still open at the chunk's end
    for chunk in column_chunks(labels):
        local = np.flatnonzero(chunk[1:] != chunk[:-1]) + 1
        if pending_value is not None and chunk[0] != pending_value:
            local = np.concatenate(([0], local))
        if pending_value is None:
            pending_value = chunk[0]
        if local.size:
            starts = np.concatenate(([pending_start], offset + local[:-1]))
            values = np.concatenate(([pending_value], chunk[local[:-1]]))
            encoder.add(starts, offset + local, values)
            pending_start, pending_value = offset + int(local[-1]), chunk[local[-1]]
        offset += chunk.size
    encoder.add(np.array([pending_start]), np.array([offset]), np.array([pending_value]))
    return encoder.finish()
