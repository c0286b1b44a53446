"""`attnseg evaluate`: score a method over a folder of images and label PNGs (docs/methods.md section 4).

Images and labels are paired by file stem. Both are centre-cropped square and resized to the
working resolution (labels nearest), as the COCO-Stuff-27 protocol does; 255 in a label is ignored.
- unsupervised: per-image Hungarian matching, pixel accuracy and mIoU.
- text: labels hold 0 = background and i = the i-th class of --classes; confusion matrix, mIoU.
- oneshot: train on --train-images/--train-masks, then per-part IoU per image, averaged over the
  images where the part occurs.
- referring: labels are instance maps (0 background, 1..N); --queries holds <stem>.json per scene,
  [{"query": "a <my-mug> mug", "instance": 2}, ...]; --concepts a folder with one sub-folder per
  identifier holding its diffusers files; mIoU, bf_acc and af_acc (From Text to Mask 5.3).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from attnseg.settings import get_settings
from workers.evaluation.metrics import ConfusionScore, PartIoUScore, ReferringScore, UnsupervisedScore
from workers.models.stable_diffusion import load_stable_diffusion

log = logging.getLogger("attnseg.evaluate")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def center_square(image: Image.Image, size: int, resample) -> Image.Image:
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), resample)


def dataset_pairs(images: Path, labels: Path) -> list[tuple[Path, Path]]:
    pairs = []
    for image_path in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        label_path = labels / f"{image_path.stem}.png"
        if not label_path.exists():
            raise SystemExit(f"no label PNG for {image_path.name}: expected {label_path}")
        pairs.append((image_path, label_path))
    if not pairs:
        raise SystemExit(f"no images (jpg, png, webp) in {images}")
    return pairs


def load_pair(image_path: Path, label_path: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    with Image.open(image_path) as image, Image.open(label_path) as label:
        if image.size != label.size:
            raise SystemExit(f"{label_path.name} is {label.size}, its image {image.size}")
        rgb = center_square(image.convert("RGB"), size, Image.BICUBIC)
        gt = center_square(label, size, Image.NEAREST)
        return np.asarray(rgb), np.asarray(gt).astype(np.int64)


def score_dataset(pairs, resolution: int, score, predict) -> dict:
    """Runs `predict(rgb) -> labels` over the pairs, adding each to `score`."""
    started = time.perf_counter()
    for index, (image_path, label_path) in enumerate(pairs):
        rgb, gt = load_pair(image_path, label_path, resolution)
        score.add(predict(rgb), gt)
        log.info("%d/%d %s", index + 1, len(pairs), image_path.name)
    result = {key: plain(value) for key, value in score.result().items()}
    return {**result, "images": len(pairs), "seconds_per_image": (time.perf_counter() - started) / len(pairs)}


def plain(value):
    """numpy results -> JSON (NaN, a class never seen, becomes null)."""
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def evaluate(args, sd, clip_loader) -> dict:
    pairs = dataset_pairs(args.images, args.labels)[: args.limit]
    if args.protocol == "unsupervised":
        from workers.methods.unsupervised import segment_unsupervised

        result = score_dataset(
            pairs,
            args.resolution,
            UnsupervisedScore(args.num_classes),
            lambda rgb: (
                segment_unsupervised(sd, rgb, kl_threshold=args.kl_threshold, resolution=args.resolution).labels
            ),
        )
        return {"protocol": "unsupervised", "kl_threshold": args.kl_threshold, **result}
    if args.protocol == "text":
        from workers.methods.textseg import segment_text

        classes = [c.strip() for c in args.classes.split(",")]
        clip = clip_loader() if args.method != "selfcross" else None
        result = score_dataset(
            pairs,
            args.resolution,
            ConfusionScore(len(classes) + 1),
            lambda rgb: segment_text(sd, clip, rgb, classes, method=args.method, resolution=args.resolution).labels,
        )
        return {"protocol": "text", "method": args.method, "classes": ["background", *classes], **result}
    if args.protocol == "referring":
        return evaluate_referring(args, sd, pairs)
    from workers.methods.oneshot import segment_oneshot, train_oneshot

    parts = [p.strip() for p in args.parts.split(",")]
    examples = [load_pair(i, m, args.resolution) for i, m in zip(args.train_images, args.train_masks, strict=True)]
    model = train_oneshot(
        sd,
        [rgb for rgb, _ in examples],
        [mask for _, mask in examples],
        parts,
        epochs=args.epochs,
        resolution=args.resolution,
    )
    result = score_dataset(
        pairs,
        args.resolution,
        PartIoUScore(len(parts) + 1),
        lambda rgb: (
            segment_oneshot(sd, model, rgb, crops_per_side=args.crops_per_side, resolution=args.resolution).labels
        ),
    )
    return {
        "protocol": "oneshot",
        "parts": ["background", *parts],
        "train_iou": model.metrics.get("train_iou"),
        **result,
    }


def load_concept_folder(folder: Path | None, class_word: str) -> dict:
    """identifier -> Concept from folder/<identifier>/ holding diffusers files (learned_embeds.* and,
    for Custom Diffusion, pytorch_custom_diffusion_weights.*)."""
    from attnseg.concept_files import EMBEDDINGS_FILE, KV_FILE
    from workers.models.concept import Concept

    concepts = {}
    for directory in sorted(p for p in (folder.iterdir() if folder else ()) if p.is_dir()):
        files = {}
        for name, stem in ((EMBEDDINGS_FILE, "learned_embeds"), (KV_FILE, "pytorch_custom_diffusion_weights")):
            found = sorted(directory.glob(f"{stem}.*"))
            if found:
                files[name] = found[0].read_bytes()
        if EMBEDDINGS_FILE not in files:
            raise SystemExit(f"{directory} has no learned_embeds.safetensors (or .bin)")
        concepts[directory.name] = Concept.from_files(files, directory.name, class_word)
    return concepts


def evaluate_referring(args, sd, pairs) -> dict:
    from workers.methods.referring import segment_referring
    from workers.models.concept import check_concept

    concepts = load_concept_folder(args.concepts, args.class_word)
    for concept in concepts.values():
        check_concept(sd, concept)
    score = ReferringScore()
    started = time.perf_counter()
    for index, (image_path, label_path) in enumerate(pairs):
        rgb, gt = load_pair(image_path, label_path, args.resolution)
        entries = json.loads((args.queries / f"{image_path.stem}.json").read_text())
        out = segment_referring(
            sd, rgb, args.class_word, [e["query"] for e in entries], concepts=concepts, resolution=args.resolution
        )
        best = [int(np.argmax(row)) if row else None for row in out.instance_scores]
        score.add(out.instance_map, best, out.assignment, gt, [int(e["instance"]) for e in entries])
        log.info("%d/%d %s", index + 1, len(pairs), image_path.name)
    result = {key: plain(value) for key, value in score.result().items()}
    return {
        "protocol": "referring",
        "class_word": args.class_word,
        "concepts": sorted(concepts),
        **result,
        "images": len(pairs),
        "seconds_per_image": (time.perf_counter() - started) / len(pairs),
    }


def main(args) -> dict:
    settings = get_settings()
    sd = load_stable_diffusion(
        settings.sd_model, device=settings.device, dtype=settings.dtype, cache_dir=settings.cache_dir
    )

    def clip_loader():
        from workers.models.clip import load_clip

        return load_clip(
            settings.clip_model,
            settings.clip_pretrained,
            device=sd.device,
            dtype=sd.dtype,
            cache_dir=settings.cache_dir,
        )

    result = evaluate(args, sd, clip_loader)
    result.update(sd_model=sd.model_id, random_weights=sd.random_weights, resolution=args.resolution)
    document = json.dumps(result, indent=2)
    if args.output:
        args.output.write_text(document + "\n")
    sys.stdout.write(document + "\n")
    return result
