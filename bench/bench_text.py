"""Text queries (POST /segment/text): the four methods on the real SD 1.5 and ViT-B/16 architectures.

Per method and measured image, `workers.methods.textseg.segment_text` runs as the worker runs it; its own
`timings_ms` give the stages (its timer syncs CUDA at every boundary), a Stopwatch the wall time of
the call, and its progress callback the memory peak of each progress stage (bench_unsupervised's
StageClock). Methods are interleaved image by image, so a change in the machine's load lands on all
of them. Warm-up images run the same and are not counted.

    python -m bench.bench_text                                  # CPU here: 1 warm-up + 2 images per method
    python -m bench.bench_text --device cuda --images 30 --json bench/results/gpu_text.json

--clip: 'ViT-B-16-random' (default: open_clip's ViT-B-16-quickgelu built with random weights, no
download), 'tiny-random', or a ViT-B-16-quickgelu pretrained tag, checkpoint file or local-dir
folder for workers.models.clip.load_clip.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import open_clip
import torch

from bench.bench_unsupervised import StageClock
from bench.common import (
    BATCH_COLUMNS,
    MIB,
    MemoryMeter,
    Stopwatch,
    add_batch_arguments,
    add_run_arguments,
    batch_throughput,
    bench_images,
    print_table,
    start_run,
    summary,
    write_json,
)
from workers.engine.jobs import segments_from_labels
from workers.methods.textseg import METHODS, channel_labels, segment_text, selfcross_batch
from workers.methods.timing import Timer
from workers.models.clip import DEFAULT_CLIP_MODEL, TINY_RANDOM, Clip, load_clip

RANDOM_VIT_B_16 = "ViT-B-16-random"
DEFAULT_CLASSES = "cat,traffic light,grass"  # 3 classes, one of them two BPE tokens
# timings_ms keys, in the order a request runs them, and what each covers
STAGE_MEANINGS = {
    "clip": "GEM: CLIP ViT-B/16 at 448, dense features, class logits, CA channels",
    "latent": "resize to the resolution + VAE encode (posterior mean)",
    "unet": "prompt encode + noise + UNet pass with capture (gem_refined/cluster: + 16-layer aggregate)",
    "propagate": "selfcross: class maps from the captured layers, S @ S @ C; gem_refined: SA^T @ CA",
    "merge": "cluster: DiffSeg KL merging at tau 0.8 + argmax at the image's size",
    "label": "channels -> label map at the image's size (argmax / naming segments)",
    "scores": "mean channel score per present label",
}
# progress stages (StageClock's names) whose memory peaks are reported
MEMORY_STAGES = ("clip", "latent", "unet_capture", "labelling")


def random_clip(device: torch.device, dtype: torch.dtype, seed: int = 0) -> Clip:
    """open_clip's ViT-B-16-quickgelu with random weights (seeded): the real GEM cost, no download."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(DEFAULT_CLIP_MODEL, pretrained=None)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return Clip(
        model=model,
        tokenizer=open_clip.get_tokenizer(DEFAULT_CLIP_MODEL),
        name=DEFAULT_CLIP_MODEL,
        pretrained=f"random-seed-{seed}",
        device=torch.device(device),
        dtype=dtype,
        random_weights=True,
    )


def load_bench_clip(name: str, device: torch.device, dtype: torch.dtype, cache_dir: Path) -> tuple[Clip, float]:
    """The CLIP model and its load time in seconds."""
    started = time.perf_counter()
    if name == RANDOM_VIT_B_16:
        clip = random_clip(device, dtype)
    elif name == TINY_RANDOM:
        clip = load_clip(TINY_RANDOM, device=device, dtype=dtype, cache_dir=cache_dir)
    else:
        clip = load_clip(DEFAULT_CLIP_MODEL, name, device=device, dtype=dtype, cache_dir=cache_dir)
    return clip, time.perf_counter() - started


def measure(sd, clip, image: np.ndarray, classes: list[str], method: str, args, meter: MemoryMeter) -> dict:
    """One segment_text call: its timings_ms, wall ms, memory peaks by progress stage (bytes), labels found."""
    clock = StageClock(sd.device, meter)
    with Stopwatch(sd.device) as watch:
        out = segment_text(sd, clip, image, classes, method=method, resolution=args.resolution, report=clock)
    clock.close()
    return {
        "ms": dict(out.timings_ms),
        "wall_ms": watch.seconds * 1000,
        "peak": dict(clock.peak),
        "extra": dict(clock.extra),
        "labels_found": sorted(out.scores),
        "passes": out.passes,
    }


def run_selfcross_batch(sd, images: list[np.ndarray], classes: list[str], args) -> None:
    """What a worker does for a batch of selfcross jobs with the same classes: one VAE call and one
    UNet call for all, then labels, scores and RLE per image."""
    channels, _, _ = selfcross_batch(sd, images, classes, seeds=list(range(len(images))), resolution=args.resolution)
    names = ["background", *classes]
    ids = list(range(len(names)))
    for image, own in zip(images, channels):
        labels, scores = channel_labels(own, image.shape[:2], 0, Timer())
        segments_from_labels(labels.cpu().numpy(), names, ids, [scores.get(i) for i in ids])


def method_rows(measured: list[dict]) -> list[dict]:
    """Stage rows of one method: timings_ms stages, their sum, the wall time, then memory by progress stage."""
    walls = [m["wall_ms"] for m in measured]
    median_wall = summary(walls)["p50"]
    rows = []
    for stage, meaning in STAGE_MEANINGS.items():
        values = [m["ms"][stage] for m in measured if stage in m["ms"]]
        if values:
            stats = summary(values)
            rows.append(
                {
                    "stage": stage,
                    "p50 ms": stats["p50"],
                    "min ms": stats["min"],
                    "max ms": stats["max"],
                    "% wall": 100 * stats["p50"] / median_wall,
                    "what": meaning,
                }
            )
    for name, values, meaning in (
        ("sum", [sum(m["ms"].values()) for m in measured], "the stages above"),
        ("wall", walls, "the segment_text call, one request's model work"),
    ):
        stats = summary(values)
        rows.append(
            {
                "stage": name,
                "p50 ms": stats["p50"],
                "min ms": stats["min"],
                "max ms": stats["max"],
                "% wall": 100 * stats["p50"] / median_wall,
                "what": meaning,
            }
        )
    return rows


def memory_rows(measured: list[dict]) -> list[dict]:
    """Per progress stage: the highest peak and peak-minus-start over the measured images."""
    rows = []
    for stage in MEMORY_STAGES:
        peaks = [m["peak"][stage] for m in measured if stage in m["peak"]]
        if peaks:
            extras = [m["extra"][stage] for m in measured if stage in m["extra"]]
            rows.append({"progress stage": stage, "peak MiB": max(peaks) / MIB, "+MiB": max(extras) / MIB})
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, dtype_help="auto: fp16 on cuda, fp32 on cpu (SD and CLIP)")
    parser.add_argument(
        "--clip",
        default=RANDOM_VIT_B_16,
        help="ViT-B-16-random (default), tiny-random, or a ViT-B-16-quickgelu pretrained tag/path",
    )
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    add_batch_arguments(parser)
    parser.add_argument("--classes", default=DEFAULT_CLASSES, help="comma-separated class names")
    parser.add_argument("--images", type=int, help="measured images per method (default 2 on cpu, 30 on cuda)")
    parser.add_argument("--warmup", type=int, help="warm-up images per method (default 1 on cpu, 3 on cuda)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    info, sd, load, meter, (width, height) = start_run(args, "Text segmentation benchmark")
    on_gpu = sd.device.type == "cuda"
    images = args.images if args.images is not None else (30 if on_gpu else 2)
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    clip, load["clip_load_s"] = load_bench_clip(args.clip, sd.device, sd.dtype, args.cache_dir)
    print(
        f"clip      {clip.name} / {clip.pretrained} ({'random weights' if clip.random_weights else 'trained'}), "
        f"{sum(p.numel() for p in clip.model.parameters()):,} parameters; load {load['clip_load_s']:.1f}"
    )
    print(
        f"run       methods {methods}; classes {classes}; {images} images of {width}x{height} at "
        f"{args.resolution} (R={args.resolution // 8}), {warmup} warm-up, per method; memory: {meter.method}"
    )

    pictures = bench_images(warmup + images, width, height)
    for picture in pictures[:warmup]:
        for method in methods:
            measure(sd, clip, picture, classes, method, args, meter)
    resident = meter.current()
    measured: dict[str, list[dict]] = {method: [] for method in methods}
    for picture in pictures[warmup:]:
        for method in methods:
            measured[method].append(measure(sd, clip, picture, classes, method, args, meter))
    print(f"resident  {resident / MIB:.0f} MiB after warm-up ({'allocated on the GPU' if on_gpu else 'process RSS'})\n")

    summaries = []
    per_method = {}
    for method in methods:
        rows, memory = method_rows(measured[method]), memory_rows(measured[method])
        walls = [m["wall_ms"] for m in measured[method]]
        throughput = len(walls) / (sum(walls) / 1000)
        labels_found = [m["labels_found"] for m in measured[method]]
        print(f"-- {method}: {throughput:.3f} images/s (1 / mean wall); labels found per image {labels_found}")
        print_table(rows, ["stage", "p50 ms", "min ms", "max ms", "% wall", "what"])
        print_table(memory, ["progress stage", "peak MiB", "+MiB"])
        summaries.append(
            {
                "method": method,
                "images/s": f"{throughput:.4g}",
                "wall p50 ms": summary(walls)["p50"],
                "wall min ms": min(walls),
                "wall max ms": max(walls),
                "peak MiB": max(row["peak MiB"] for row in memory),
                "max +MiB": max(row["+MiB"] for row in memory),
            }
        )
        per_method[method] = {
            "stages": rows,
            "memory": memory,
            "images_per_s": throughput,
            "labels_found": labels_found,
            "per_image": measured[method],
        }
    print("-- summary")
    print_table(summaries, ["method", "images/s", "wall p50 ms", "wall min ms", "wall max ms", "peak MiB", "max +MiB"])
    print(f"load average now      {[round(x, 2) for x in os.getloadavg()]}")

    batches = (
        batch_throughput(
            sd.device,
            pictures,
            args.batch,
            args.batch_repeats,
            lambda batch: run_selfcross_batch(sd, batch, classes, args),
        )
        if args.batch
        else []
    )
    if batches:
        print(
            f"\n-- selfcross batched: B images with the same classes share the VAE and UNet calls, then labels "
            f"and RLE per image ({args.batch_repeats} timed batches per size, after one untimed)"
        )
        print_table(batches, BATCH_COLUMNS)
        print(f"load average now      {[round(x, 2) for x in os.getloadavg()]}")

    report = {
        "benchmark": "text",
        "machine": info,
        "model": sd.describe(),
        "clip": clip.describe(),
        "load": load,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "images": images,
        "warmup": warmup,
        "memory_method": meter.method,
        "resident_bytes": resident,
        "summary": summaries,
        "methods": per_method,
        "batches": batches,
        "load_average_end": os.getloadavg(),
    }
    write_json(report, args.json)
    return report


if __name__ == "__main__":
    main()
