"""Job functions, enqueued by dotted path (attnseg.queue.KINDS): payload (JSON) in, API result (JSON) out."""

from __future__ import annotations

import time

import numpy as np
import torch

from attnseg import oneshot_store, rle
from attnseg.concept_files import identifiers_in
from attnseg.images import load_mask, picture_id
from workers.engine import runtime
from workers.engine.batch import Batch, Member, attempt, fail_live, shared_report
from workers.engine.concept_records import load_concepts
from workers.engine.context import JobContext, JobFailure, job_function
from workers.engine.latent_cache import member_latents
from workers.engine.pictures import fetch_image, original_size
from workers.methods.gem import GEM_IMAGE_SIZE
from workers.methods.oneshot import ModelMismatchError, OneshotModel, segment_oneshot, train_oneshot
from workers.methods.prompts import PromptTooLongError
from workers.methods.textseg import TextSegmentation, channel_labels, selfcross_batch
from workers.methods.textseg import segment_text as run_text
from workers.methods.timing import Timer
from workers.methods.unsupervised import UnsupervisedSegmentation, attention_pass, segment_row
from workers.methods.unsupervised import segment_unsupervised as run_diffseg


def segments_from_labels(labels: np.ndarray, names: list, label_ids: list, scores: list) -> list[dict]:
    """One API segment per label present; `names`, `label_ids`, `scores` are indexed by label."""
    segments = []
    for label, mask_rle, area, box in rle.label_map_to_segments(labels):
        segments.append(
            {
                "id": len(segments) + 1,
                "label": names[label],
                "label_id": label_ids[label],
                "score": scores[label],
                "area": area,
                "bbox": box,
                "segmentation": mask_rle,
            }
        )
    return segments


def finish(ctx: JobContext, image_entry: dict, segments: list[dict], timings_ms: dict, **extra) -> dict:
    """The API result; keeps the image as long as the result so the overlay can be drawn."""
    rt = runtime.current()
    ctx.connection.expire(image_entry["key"], rt.settings.result_ttl_s)
    return {
        "image": {"id": picture_id(image_entry["key"]), "width": image_entry["width"], "height": image_entry["height"]},
        "mask_format": "coco_rle",
        "bbox_format": "xywh",
        "segments": segments,
        **extra,
        "random_weights": rt.sd.random_weights,
        "timings_ms": {**timings_ms, **ctx.stages_ms},
    }


def timings(stages_ms: dict, encode_started: float) -> dict:
    """docs/api.md 6.3: `inference` (all model and method stages), `encode` (masks to RLE), and the stages."""
    return {
        "inference": round(sum(stages_ms.values()), 1),
        "encode": round((time.perf_counter() - encode_started) * 1000, 1),
        **stages_ms,
    }


@job_function("unsupervised")
def segment_unsupervised(ctx: JobContext, payload: dict) -> dict:
    rt = runtime.current()
    params = payload["params"]
    ctx.update_params(sd_model=rt.sd.model_id)
    image = fetch_image(ctx, payload["image"], min_side=resolution_side(params))
    try:
        out = run_diffseg(rt.sd, image, report=ctx.report, output_size=original_size(payload["image"]), **params)
    except PromptTooLongError as exc:  # vocabulary words longer in tokens than the API's bound could tell
        raise JobFailure("prompt_too_long", f"vocabulary: {exc}") from None
    return unsupervised_result(ctx, payload, out)


def unsupervised_result(ctx: JobContext, payload: dict, out: UnsupervisedSegmentation) -> dict:
    started = time.perf_counter()
    count = len(out.names)
    segments = segments_from_labels(out.labels, out.names, [None] * count, out.scores)
    return finish(ctx, payload["image"], segments, timings(out.timings_ms, started))


def unsupervised_share_key(params: dict) -> tuple | None:
    """DiffSeg jobs share a pass when resolution and timestep agree (the pass ignores the seed);
    with a vocabulary the prompt differs, so those run alone."""
    if params.get("vocabulary") or "resolution" not in params or "timestep" not in params:
        return None
    return params["resolution"], params["timestep"]


def segment_unsupervised_batch(members: list[Member], done) -> None:
    """`segment_unsupervised` for jobs of one share key (pictures decoded): VAE, text encoder and UNet
    once for all; aggregation, merging and labels per job, RLE left to `encode`."""
    rt = runtime.current()
    attempt(members, lambda m: m.ctx.update_params(sd_model=rt.sd.model_id))
    running = [m for m in members if m.live]
    if not running:
        return
    params = running[0].payload["params"]
    try:
        shared = attention_pass(
            rt.sd,
            member_latents(rt.latents, rt.sd, running, params["resolution"]),
            timestep=params["timestep"],
            resolution=params["resolution"],
            report=shared_report(running),
        )
    except Exception as exc:  # noqa: BLE001 - the pass is every member's
        fail_live(running, exc)
        return

    def label(member: Member, row: int) -> None:
        own = member.payload["params"]
        member.image = member.latents = None
        out = segment_row(
            shared,
            row,
            original_size(member.payload["image"]),
            kl_threshold=own["kl_threshold"],
            grid=own["grid"],
            iterations=own["iterations"],
            refine=own["refine"],
            report=member.ctx.report,
        )
        member.encode = lambda: unsupervised_result(member.ctx, member.payload, out)

    for row, member in enumerate(running):
        attempt([member], lambda m, row=row: label(m, row))
        done(member)


@job_function("text")
def segment_text(ctx: JobContext, payload: dict) -> dict:
    rt = runtime.current()
    params = dict(payload["params"])
    classes = params.pop("classes")
    if params["method"] != "selfcross" and rt.clip is None:
        raise JobFailure(
            "clip_unavailable",
            f"method {params['method']} needs a CLIP model and this worker runs without one (ATTNSEG_CLIP_MODEL=none)",
        )
    ctx.update_params(sd_model=rt.sd.model_id, clip_model=rt.clip.name if rt.clip else None)
    concepts = load_concepts(ctx, payload.get("concepts", {}))
    image = fetch_image(ctx, payload["image"], min_side=text_side(payload["params"]))
    try:
        out = run_text(
            rt.sd,
            rt.clip,
            image,
            classes,
            report=ctx.report,
            output_size=original_size(payload["image"]),
            concepts=concepts,
            **params,
        )
    except PromptTooLongError as exc:
        raise JobFailure("prompt_too_long", str(exc)) from None
    return text_result(ctx, payload, out)


def text_result(ctx: JobContext, payload: dict, out: TextSegmentation) -> dict:
    started = time.perf_counter()
    names = ["background", *payload["params"]["classes"]]
    ids = list(range(len(names)))
    segments = segments_from_labels(out.labels, names, ids, [out.scores.get(i) for i in ids])
    return finish(ctx, payload["image"], segments, timings(out.timings_ms, started), labels=names, passes=out.passes)


def text_share_key(params: dict) -> tuple | None:
    """selfcross jobs share a pass when everything but the image and the seed agrees; classes that
    name a concept (its weights enter the pass) run alone."""
    shared = ("classes", "background", "samples", "timestep", "resolution", "gate_threshold", "background_threshold")
    if params.get("method") != "selfcross" or any(name not in params for name in shared):
        return None
    if any(identifiers_in(name) for name in params["classes"]):
        return None
    return (
        tuple(params["classes"]),
        params["background"],
        tuple(params.get("background_words") or ()),
        params["samples"],
        params["timestep"],
        params["resolution"],
        params["gate_threshold"],
        params["background_threshold"],
    )


def segment_text_batch(members: list[Member], done) -> None:
    """`segment_text` (selfcross) for jobs of one share key (pictures decoded): VAE once, one UNet call
    per draw for all; labels and scores per job, RLE left to `encode`."""
    rt = runtime.current()
    attempt(
        members, lambda m: m.ctx.update_params(sd_model=rt.sd.model_id, clip_model=rt.clip.name if rt.clip else None)
    )
    running = [m for m in members if m.live]
    if not running:
        return
    params = running[0].payload["params"]
    try:
        channels, passes, shared_ms = selfcross_batch(
            rt.sd,
            member_latents(rt.latents, rt.sd, running, params["resolution"]),
            params["classes"],
            seeds=[m.payload["params"]["seed"] for m in running],
            background=params["background"],
            background_words=params.get("background_words"),
            samples=params["samples"],
            timestep=params["timestep"],
            resolution=params["resolution"],
            gate_threshold=params["gate_threshold"],
            background_threshold=params["background_threshold"],
            report=shared_report(running),
        )
    except PromptTooLongError as exc:
        fail_live(running, JobFailure("prompt_too_long", str(exc)))
        return
    except Exception as exc:  # noqa: BLE001 - the pass is every member's
        fail_live(running, exc)
        return

    def label(member: Member, own: torch.Tensor) -> None:
        member.ctx.report("labelling", 0.85)
        timer = Timer()
        timer.ms = dict(shared_ms)
        member.image = member.latents = None
        labels, scores = channel_labels(
            own, original_size(member.payload["image"]), 0 if params["background"] else 1, timer
        )
        out = TextSegmentation(labels.cpu().numpy(), scores, passes, timer.ms)
        member.encode = lambda: text_result(member.ctx, member.payload, out)

    for member, own in zip(running, channels):
        attempt([member], lambda m, own=own: label(m, own))
        done(member)


def mark_model_failed(ctx: JobContext, payload: dict, error: dict) -> None:
    oneshot_store.update(ctx.connection, payload["model_id"], status="failed", error=error)


@job_function("oneshot_train", on_error=mark_model_failed)
def oneshot_train(ctx: JobContext, payload: dict) -> dict:
    rt = runtime.current()
    params = payload["params"]
    model_id = payload["model_id"]
    record = oneshot_store.update(ctx.connection, model_id, sd_model=rt.sd.model_id)
    if record is None:
        ctx.report("starting", 0.0)  # DELETE /oneshot/{id} cancels before it deletes: a cancel, if so
        raise JobFailure("model_deleted", f"model {model_id} was deleted before its training started")
    ctx.update_params(sd_model=rt.sd.model_id)
    examples = [(fetch_image(ctx, e["image"]), fetch_image(ctx, e["mask"], load_mask)) for e in payload["examples"]]
    model = train_oneshot(
        rt.sd,
        [image for image, _ in examples],
        [mask.astype(np.int64) for _, mask in examples],
        record["labels"],
        epochs=params["epochs"],
        learning_rate=params["learning_rate"],
        seed=params["seed"],
        resolution=params["resolution"],
        min_crop=params["min_crop"],
        report=ctx.report,
    )
    if (
        oneshot_store.update(ctx.connection, model_id, status="ready", artefact=model.to_json(), metrics=model.metrics)
        is None
    ):
        raise JobFailure("model_deleted", f"model {model_id} was deleted during its training")
    return {
        "model_id": model_id,
        "labels": ["background", *record["labels"]],
        "metrics": model.metrics,
        "random_weights": rt.sd.random_weights,
    }


def ready_model(connection, model_id: str) -> OneshotModel:
    record = oneshot_store.get(connection, model_id)
    if record is None:
        raise JobFailure("model_deleted", f"one-shot model {model_id} does not exist (deleted)")
    if record["status"] != "ready":
        reason = (record.get("error") or {}).get("message", "its training did not finish")
        raise JobFailure("model_failed", f"one-shot model {model_id} is not usable: {reason}")
    return OneshotModel.from_json(record["artefact"])


@job_function("oneshot_segment")
def oneshot_segment(ctx: JobContext, payload: dict) -> dict:
    rt = runtime.current()
    params = payload["params"]
    model = ready_model(ctx.connection, payload["model_id"])
    ctx.update_params(sd_model=rt.sd.model_id)
    image = fetch_image(ctx, payload["image"], min_side=resolution_side(params))
    try:
        out = segment_oneshot(
            rt.sd,
            model,
            image,
            crops_per_side=params["crops_per_side"],
            seed=params["seed"],
            resolution=params["resolution"],
            report=ctx.report,
            output_size=original_size(payload["image"]),
        )
    except ModelMismatchError as exc:
        raise JobFailure("model_mismatch", str(exc)) from None
    started = time.perf_counter()
    names = ["background", *model.labels]
    ids = list(range(len(names)))
    segments = segments_from_labels(out.labels, names, ids, [out.scores.get(i) for i in ids])
    return finish(ctx, payload["image"], segments, timings(out.timings_ms, started), labels=names)


def resolution_side(params: dict) -> int:
    """The working size of the methods that see the picture through SD alone: the resolution."""
    return params["resolution"]


def text_side(params: dict) -> int:
    """selfcross sees the picture through SD; the GEM methods also through CLIP, at GEM_IMAGE_SIZE."""
    return params["resolution"] if params["method"] == "selfcross" else max(params["resolution"], GEM_IMAGE_SIZE)


# Queued jobs of these kinds may share one pass (workers/engine/batch.py; attnseg.queue.KINDS names them).
UNSUPERVISED_BATCH = Batch("unsupervised", unsupervised_share_key, segment_unsupervised_batch, reuses_latents=True)
TEXT_BATCH = Batch("text", text_share_key, segment_text_batch, reuses_latents=True)
