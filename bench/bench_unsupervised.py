"""DiffSeg (POST /segment/unsupervised) on the real SD 1.5 architecture: stage times, images/s, memory.

Each measured image runs, in this order:
  1. workers.methods.unsupervised.segment_unsupervised, the code the worker runs, timed stage by stage
     through its progress callback (a device sync at every stage boundary, so GPU time lands in
     the stage that queued it): latent (resize + VAE encode + empty-prompt text encode), UNet with
     the 16 self-attention layers captured, aggregate, merge;
  2. workers.engine.jobs.segments_from_labels: the label map to COCO RLE segments, as the job does;
  3. for the breakdown, alone: VAE encode, text encode, and one UNet call without capture (the
     same latents, timestep and text), so capture overhead = UNet with capture - UNet without.
Warm-up images run the same sequence and are not counted. "total" is 1 + 2: one request's work.

    python -m bench.bench_unsupervised                        # CPU here: sd15-random, 3 images
    python -m bench.bench_unsupervised --device cuda --images 50 --json bench/gpu.json

--model: 'sd15-random' (built once into the cache, ~4.3 GB, then loaded with from_pretrained like
real weights), 'tiny-random', a local diffusers directory, or a hub id already in the cache.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

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
    synchronize,
    write_json,
)
from workers.engine.jobs import segments_from_labels
from workers.methods import diffseg
from workers.methods.unsupervised import attention_pass, segment_row, segment_unsupervised
from workers.models.sd_ops import encode_latents, encode_prompts, image_to_pixels, unet_noise
from workers.models.stable_diffusion import StableDiffusion

# segment_unsupervised's progress stages -> the names in the table
STAGE_NAMES = {"encoding": "latent", "attention": "unet_capture", "aggregating": "aggregate", "merging": "merge"}
STAGE_MEANINGS = {
    "latent": "resize + VAE encode + text encode, in the pipeline",
    "unet_capture": "UNet pass, 16 self-attention layers captured",
    "aggregate": "4 grids -> one (R^2, R^2) map",
    "merge": "KL merging + argmax at the image's size",
    "rle": "label map -> COCO RLE segments",
    "total": "one request's work (the rows above)",
    "vae_encode": "breakdown: VAE encode alone",
    "text_encode": "breakdown: text encode alone",
    "unet_plain": "breakdown: UNet pass, stock processors",
}
BREAKDOWN = ("vae_encode", "text_encode", "unet_plain")  # measured apart, not part of "total"


class StageClock:
    """A progress callback for segment_unsupervised: the time and memory peak of every stage.

    A stage runs from one progress report to the next (the last one until `close`). Each boundary
    syncs the device first, so queued GPU kernels are charged to the stage that launched them.
    """

    def __init__(self, device: torch.device, meter: MemoryMeter):
        self.device = device
        self.meter = meter
        self.ms: dict[str, float] = {}
        self.peak: dict[str, int] = {}
        self.extra: dict[str, int] = {}  # peak minus the memory in use when the stage began
        self._stage: str | None = None

    def __call__(self, stage: str, fraction: float) -> None:
        self.close()
        self._stage = STAGE_NAMES.get(stage, stage)
        self.meter.reset()
        self._start_memory = self.meter.current()
        self._started = time.perf_counter()

    def close(self) -> None:
        if self._stage is None:
            return
        synchronize(self.device)
        self.ms[self._stage] = (time.perf_counter() - self._started) * 1000
        self.peak[self._stage] = self.meter.peak()
        self.extra[self._stage] = self.peak[self._stage] - self._start_memory
        self._stage = None


def measure_image(sd: StableDiffusion, image: np.ndarray, args, meter: MemoryMeter) -> dict:
    """One image: the pipeline by stage, RLE, and the breakdown calls. Times in ms, memory in bytes."""
    params = {
        "kl_threshold": args.kl_threshold,
        "grid": args.grid,
        "iterations": args.iterations,
        "timestep": args.timestep,
        "resolution": args.resolution,
    }
    clock = StageClock(sd.device, meter)
    out = segment_unsupervised(sd, image, report=clock, **params)
    clock.close()
    ms, peak, extra = dict(clock.ms), dict(clock.peak), dict(clock.extra)

    with Stopwatch(sd.device) as watch:
        count = len(out.names)
        segments = segments_from_labels(out.labels, out.names, [None] * count, out.scores)
    ms["rle"] = watch.seconds * 1000
    ms["total"] = sum(ms.values())

    with torch.inference_mode():
        pixels = image_to_pixels(image, args.resolution, sd.device, sd.dtype)
        with Stopwatch(sd.device) as watch:
            latents = encode_latents(sd, pixels)
        ms["vae_encode"] = watch.seconds * 1000
        with Stopwatch(sd.device) as watch:
            text = encode_prompts(sd, [""])  # uncached: what the worker's prompt cache saves per request
        ms["text_encode"] = watch.seconds * 1000
        meter.reset()
        start_memory = meter.current()
        with Stopwatch(sd.device) as watch:
            noise = unet_noise(sd, latents, args.timestep, text)
        ms["unet_plain"] = watch.seconds * 1000
        peak["unet_plain"] = meter.peak()
        extra["unet_plain"] = peak["unet_plain"] - start_memory
    return {
        "ms": ms,
        "peak": peak,
        "extra": extra,
        "segments": len(segments),
        "unet_output_finite": bool(torch.isfinite(noise).all()),
    }


def run_batch(sd: StableDiffusion, images: list[np.ndarray], args) -> None:
    """What a worker does for a batch of DiffSeg jobs: one shared pass, then per image merge and RLE."""
    shared = attention_pass(sd, images, timestep=args.timestep, resolution=args.resolution)
    for row, image in enumerate(images):
        out = segment_row(
            shared, row, image.shape[:2], kl_threshold=args.kl_threshold, grid=args.grid, iterations=args.iterations
        )
        count = len(out.names)
        segments_from_labels(out.labels, out.names, [None] * count, out.scores)


def planted_attention(side: int, blocks_per_axis: int, device) -> torch.Tensor:
    """(side^2, side^2) attention in which every pixel attends uniformly to its own square block.

    DiffSeg finds exactly blocks_per_axis^2 segments in it: a stand-in for trained weights, whose
    maps hold tens of segments where random weights give one.
    """
    block = side // blocks_per_axis
    axis = torch.arange(side, device=device) // block
    ids = (axis[:, None] * blocks_per_axis + axis[None, :]).flatten()
    same = (ids[:, None] == ids[None, :]).float()
    return same / same.sum(1, keepdim=True)


def merge_sweep(device: torch.device, args, width: int, height: int) -> list[dict]:
    """merge + RLE time against the number of segments, on planted maps at this run's R and size."""
    rows = []
    for blocks_per_axis in (1, 2, 4, 8):
        attn = planted_attention(args.resolution // 8, blocks_per_axis, device)
        times = {"merge": [], "rle": []}
        for _ in range(3):
            with Stopwatch(device) as watch:
                labels = (
                    diffseg.merge(
                        attn,
                        grid=args.grid,
                        iterations=args.iterations,
                        kl_threshold=args.kl_threshold,
                        output_size=(height, width),
                    )
                    .cpu()
                    .numpy()
                )
            times["merge"].append(watch.seconds * 1000)
            with Stopwatch(device) as watch:
                count = int(labels.max()) + 1
                segments = segments_from_labels(labels, [None] * count, [None] * count, [None] * count)
            times["rle"].append(watch.seconds * 1000)
        rows.append(
            {
                "segments": len(segments),
                "merge min ms": min(times["merge"]),
                "merge p50 ms": summary(times["merge"])["p50"],
                "rle min ms": min(times["rle"]),
                "rle p50 ms": summary(times["rle"])["p50"],
            }
        )
    return rows


def report_rows(measured: list[dict], total_ms: list[float]) -> list[dict]:
    rows = []
    median_total = summary(total_ms)["p50"]
    for stage in STAGE_MEANINGS:
        values = [m["ms"][stage] for m in measured if stage in m["ms"]]
        if not values:
            continue
        stats = summary(values)
        peaks = [m["peak"][stage] for m in measured if stage in m["peak"]]
        extras = [m["extra"][stage] for m in measured if stage in m["extra"]]
        rows.append(
            {
                "stage": stage,
                "p50 ms": stats["p50"],
                "min ms": stats["min"],
                "max ms": stats["max"],
                "% total": None if stage in BREAKDOWN else 100 * stats["p50"] / median_total,
                "peak MiB": max(peaks) / MIB if peaks else None,
                "+MiB": max(extras) / MIB if extras else None,
                "what": STAGE_MEANINGS[stage],
            }
        )
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, dtype_help="auto: fp16 on cuda, fp32 on cpu")
    parser.add_argument("--images", type=int, help="measured images (default 3 on cpu, 30 on cuda)")
    parser.add_argument("--warmup", type=int, help="warm-up images, not counted (default 1 on cpu, 3 on cuda)")
    parser.add_argument("--kl-threshold", type=float, default=1.0)
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--timestep", type=int, default=300)
    add_batch_arguments(parser)
    parser.add_argument(
        "--no-merge-sweep",
        dest="merge_sweep",
        action="store_false",
        help="skip merge + RLE timing on planted maps with 1, 4, 16, 64 segments",
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    info, sd, load, meter, (width, height) = start_run(args, "DiffSeg unsupervised benchmark")
    on_gpu = sd.device.type == "cuda"
    images = args.images if args.images is not None else (30 if on_gpu else 3)
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    print(
        f"run       {images} images of {width}x{height} at {args.resolution} (R={args.resolution // 8}), "
        f"{warmup} warm-up; tau {args.kl_threshold}, grid {args.grid}, t {args.timestep}; memory: {meter.method}"
    )

    pictures = bench_images(warmup + images, width, height)
    for picture in pictures[:warmup]:
        measure_image(sd, picture, args, meter)
    resident = meter.current()
    measured = [measure_image(sd, picture, args, meter) for picture in pictures[warmup:]]
    print(f"resident  {resident / MIB:.0f} MiB after warm-up ({'allocated on the GPU' if on_gpu else 'process RSS'})\n")

    total_ms = [m["ms"]["total"] for m in measured]
    rows = report_rows(measured, total_ms)
    print_table(rows, ["stage", "p50 ms", "min ms", "max ms", "% total", "peak MiB", "+MiB", "what"])

    unet_capture = summary([m["ms"]["unet_capture"] for m in measured])
    unet_plain = summary([m["ms"]["unet_plain"] for m in measured])
    throughput = len(measured) / (sum(total_ms) / 1000)
    capture_memory = max(m["peak"]["unet_capture"] for m in measured) - max(m["peak"]["unet_plain"] for m in measured)
    segments = [m["segments"] for m in measured]
    finite = all(m["unet_output_finite"] for m in measured)
    print(f"images/s              {throughput:.3f}  (1 / mean total; one image at a time)")
    overhead = {key: unet_capture[key] - unet_plain[key] for key in ("p50", "min")}
    ratio = {key: unet_capture[key] / unet_plain[key] - 1 for key in ("p50", "min")}
    print(
        f"capture overhead      {overhead['p50']:+.0f} ms per UNet pass by p50 ({100 * ratio['p50']:+.0f}%), "
        f"{overhead['min']:+.0f} ms by min ({100 * ratio['min']:+.0f}%); peak memory {capture_memory / MIB:+.0f} MiB"
    )
    print(f"segments per image    {segments}  (random weights: merge and RLE costs grow with this)")
    print(f"UNet output finite    {finite}")
    print(f"load average now      {[round(x, 2) for x in os.getloadavg()]}\n")

    batches = (
        batch_throughput(sd.device, pictures, args.batch, args.batch_repeats, lambda batch: run_batch(sd, batch, args))
        if args.batch
        else []
    )
    if batches:
        print(
            f"batched: B images share one VAE + text + UNet pass, then merge and RLE per image "
            f"({args.batch_repeats} timed batches per size, after one untimed)"
        )
        print_table(batches, BATCH_COLUMNS)
        print(f"load average now      {[round(x, 2) for x in os.getloadavg()]}\n")

    sweep = merge_sweep(sd.device, args, width, height) if args.merge_sweep else []
    if sweep:
        print(
            f"merge + RLE against the number of segments (planted maps, R={args.resolution // 8}, "
            f"output {width}x{height}, 3 runs each)"
        )
        print_table(sweep, ["segments", "merge min ms", "merge p50 ms", "rle min ms", "rle p50 ms"])

    report = {
        "benchmark": "unsupervised",
        "machine": info,
        "model": sd.describe(),
        "load": load,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "images": images,
        "warmup": warmup,
        "memory_method": meter.method,
        "resident_bytes": resident,
        "stages": rows,
        "images_per_s": throughput,
        "capture_overhead_ms": overhead,
        "capture_overhead_ratio": ratio,
        "capture_peak_bytes": capture_memory,
        "segments": segments,
        "unet_output_finite": finite,
        "merge_sweep": sweep,
        "batches": batches,
        "per_image": measured,
        "load_average_end": os.getloadavg(),
    }
    write_json(report, args.json)
    return report


if __name__ == "__main__":
    main()
