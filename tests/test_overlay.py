"""The overlay at a bounded size and with a bounded number in flight (real Redis, RQ's SimpleWorker
running a stand-in job that returns segments; no torch)."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from attnseg import rle
from attnseg.images import store_bytes
from tests.support import enqueue_stand_in, work_burst


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def succeeded_job(connection, width: int, height: int) -> str:
    """A succeeded job over a one-colour picture: segment 1 the left half, segment 2 the rest."""
    key = store_bytes(connection, "default", png(np.full((height, width, 3), 90, np.uint8)), ttl_s=600)
    left = np.zeros((height, width), bool)
    left[:, : width // 2] = True
    segments = [
        {"id": i + 1, "label": name, "bbox": rle.bbox(mask), "segmentation": rle.encode(mask)}
        for i, (name, mask) in enumerate((("left", left), ("right", ~left)))
    ]
    image = {"key": key, "width": width, "height": height}
    job = enqueue_stand_in(connection, image=image, result={"image": image, "segments": segments})
    work_burst(connection)
    return job.id


@pytest.mark.parametrize("seed", range(4))
def test_sampling_an_rle_equals_sampling_its_decoded_mask(seed):
    rng = np.random.default_rng(seed)
    height, width = rng.integers(1, 90, size=2)
    mask = rng.random((height, width)) < rng.random()
    rows = np.sort(rng.integers(0, height, size=rng.integers(1, 40)))
    cols = np.sort(rng.integers(0, width, size=rng.integers(1, 300)))  # over one block of columns
    for encoded in (rle.encode(mask), {"size": [int(height), int(width)], "counts": rle.mask_to_counts(mask)}):
        assert np.array_equal(rle.decode_sampled(encoded, rows, cols), mask[np.ix_(rows, cols)])
    with pytest.raises(ValueError, match="RLE covers"):
        rle.decode_sampled({"size": [int(height) + 1, int(width)], "counts": rle.encode(mask)["counts"]}, rows, cols)


def test_a_large_picture_is_drawn_at_the_bounded_size_without_full_size_arrays(make_client, redis_server):
    """The issue's case in small: a one-colour PNG of 4000x3000 is 40 KB; drawing it at full size
    made float canvases and masks of its full size (here 144 MB for the canvas alone)."""
    client = make_client(overlay_max_side=400)
    job_id = succeeded_job(redis_server.client(), 4000, 3000)
    tracemalloc.start()  # numpy's arrays are traced (Pillow's own decoding buffers are not)
    try:
        response = client.get(f"/jobs/{job_id}/overlay.png")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 200, response.text
    drawing = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
    assert drawing.shape == (300, 400, 3)
    assert peak < 20 * drawing.nbytes, f"{peak / 2**20:.1f} MiB traced for a {drawing.nbytes / 2**20:.2f} MiB drawing"
    # Each half is tinted in its own colour (away from the outlines and the labels).
    left, right = drawing[150:280, 20:180].reshape(-1, 3), drawing[150:280, 220:380].reshape(-1, 3)
    assert len(np.unique(left, axis=0)) == 1 and len(np.unique(right, axis=0)) == 1
    assert not np.array_equal(left[0], right[0]) and not np.array_equal(left[0], [90, 90, 90])


def test_a_small_picture_keeps_its_size(client, redis_server):
    job_id = succeeded_job(redis_server.client(), 30, 20)
    response = client.get(f"/jobs/{job_id}/overlay.png")
    assert response.status_code == 200 and Image.open(io.BytesIO(response.content)).size == (30, 20)


def test_overlays_beyond_the_concurrency_are_429_with_retry_after(make_client, redis_server):
    client = make_client(overlay_concurrency=2)
    job_id = succeeded_job(redis_server.client(), 30, 20)
    slots = client.app.state.overlay_slots
    assert slots.acquire(blocking=False) and slots.acquire(blocking=False)  # two drawings in flight
    try:
        busy = client.get(f"/jobs/{job_id}/overlay.png")
    finally:
        slots.release()
        slots.release()
    assert busy.status_code == 429 and busy.headers["Retry-After"] == "1"
    assert busy.json()["error"]["code"] == "overlays_busy"
    assert client.get(f"/jobs/{job_id}/overlay.png").status_code == 200  # the slots were given back
