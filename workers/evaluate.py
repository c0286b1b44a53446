"""`attnseg evaluate`: score a method over a folder of images and label PNGs (methods.md section 4).

Images and labels are paired by file stem. Both are centre-cropped square and resized to the
working resolution (labels nearest), as the COCO-Stuff-27 protocol does; 255 in a label is ignored.
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
from workers.metrics import UnsupervisedScore
from workers.models import load_stable_diffusion
from workers.unsupervised import segment_unsupervised

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


def evaluate_unsupervised(sd, pairs, *, num_classes: int, kl_threshold: float, resolution: int) -> dict:
    score = UnsupervisedScore(num_classes)
    started = time.perf_counter()
    for index, (image_path, label_path) in enumerate(pairs):
        rgb, gt = load_pair(image_path, label_path, resolution)
        out = segment_unsupervised(sd, rgb, kl_threshold=kl_threshold, resolution=resolution)
        score.add(out.labels, gt)
        log.info("%d/%d %s: %d segments", index + 1, len(pairs), image_path.name, len(out.names))
    result = score.result()
    return {"protocol": "unsupervised", "images": len(pairs), "kl_threshold": kl_threshold,
            "pixel_accuracy": result["pixel_accuracy"], "miou": result["miou"],
            "per_class_iou": [None if np.isnan(v) else v for v in np.asarray(result["per_class_iou"]).tolist()],
            "seconds_per_image": (time.perf_counter() - started) / len(pairs)}


def main(args) -> dict:
    settings = get_settings()
    sd = load_stable_diffusion(settings.sd_model, device=settings.device, dtype=settings.dtype,
                               cache_dir=settings.cache_dir)
    pairs = dataset_pairs(args.images, args.labels)[: args.limit]
    result = evaluate_unsupervised(sd, pairs, num_classes=args.num_classes, kl_threshold=args.kl_threshold,
                                   resolution=args.resolution)
    result["sd_model"] = sd.model_id
    result["random_weights"] = sd.random_weights
    document = json.dumps(result, indent=2)
    if args.output:
        args.output.write_text(document + "\n")
    sys.stdout.write(document + "\n")
    return result
