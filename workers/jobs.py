"""Job functions, enqueued by dotted path: payload (JSON) in, API result (JSON) out."""

from __future__ import annotations

import time

import numpy as np

from attnseg import rle
from attnseg.images import ImageMissingError, load_image
from workers import runtime
from workers.context import JobContext, JobFailure, job_function
from workers.unsupervised import segment_unsupervised as run_diffseg


def fetch_image(ctx: JobContext, entry: dict) -> np.ndarray:
    try:
        return load_image(ctx.connection, entry["key"])
    except ImageMissingError as exc:
        raise JobFailure("image_expired", str(exc)) from None


def segments_from_labels(labels: np.ndarray, names: list, label_ids: list, scores: list) -> list[dict]:
    """One API segment per label present; `names`, `label_ids`, `scores` are indexed by label."""
    segments = []
    for label, mask_rle, area, box in rle.label_map_to_segments(labels):
        segments.append({"id": len(segments) + 1, "label": names[label], "label_id": label_ids[label],
                         "score": scores[label], "area": area, "bbox": box, "segmentation": mask_rle})
    return segments


def finish(ctx: JobContext, image_entry: dict, segments: list[dict], timings_ms: dict, **extra) -> dict:
    """The API result; keeps the image as long as the result so the overlay can be drawn."""
    rt = runtime.current()
    ctx.connection.expire(image_entry["key"], rt.settings.result_ttl_s)
    return {"image": {"width": image_entry["width"], "height": image_entry["height"]},
            "mask_format": "coco_rle", "bbox_format": "xywh", "segments": segments, **extra,
            "random_weights": rt.sd.random_weights, "timings_ms": timings_ms}


def timings(stages_ms: dict, encode_started: float) -> dict:
    """api.md timings: `inference` (all model and method stages), `encode` (masks to RLE), and the stages."""
    return {"inference": round(sum(stages_ms.values()), 1),
            "encode": round((time.perf_counter() - encode_started) * 1000, 1), **stages_ms}


@job_function("unsupervised")
def segment_unsupervised(ctx: JobContext, payload: dict) -> dict:
    rt = runtime.current()
    params = payload["params"]
    ctx.update_params(sd_model=rt.sd.model_id)
    image = fetch_image(ctx, payload["image"])
    out = run_diffseg(rt.sd, image, report=ctx.report, **params)
    started = time.perf_counter()
    count = len(out.names)
    segments = segments_from_labels(out.labels, out.names, [None] * count, out.scores)
    return finish(ctx, payload["image"], segments, timings(out.timings_ms, started))
