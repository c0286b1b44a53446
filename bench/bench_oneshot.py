"""One-shot parts (SLiMe, POST /oneshot/train and /oneshot/{id}/segment) on the real SD 1.5 architecture.

Three parts, in this order:
  1. `workers.methods.oneshot.train_oneshot` on one annotated picture for --run-epochs epochs, as the worker
     runs it: its timings_ms (training steps, training-set IoU checks) and the time of every epoch
     from its progress callback. It is also the warm-up of everything below and gives the model.
  2. --epochs more training epochs, one at a time and measured alone: `workers.methods.oneshot.train_step`
     (augment, VAE sample, UNet [uncond, learned] forward with capture, SLiMe loss, backward, Adam
     step), wired as train_oneshot wires it, with the peak memory of each epoch. With one training
     picture an epoch is one step.
  3. `workers.methods.oneshot.segment_oneshot` with the trained model, crops_per_side 1 and 2: its
     timings_ms, wall time and peak memory.

    python -m bench.bench_oneshot                              # CPU here: 1 + 3 epochs, 2 + 2 images
    python -m bench.bench_oneshot --device cuda --json bench/results/gpu_oneshot.json

The training picture is bench_unsupervised's (a red left half, a blue right half, a green block at
the bottom middle) with its regions as parts: 1 = "green block", 2 = "blue half", 0 = the red rest.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import (
    MIB,
    MemoryMeter,
    Stopwatch,
    add_run_arguments,
    bench_images,
    print_table,
    start_run,
    summary,
    write_json,
)
from workers.methods.oneshot import (
    part_prompt_outputs,
    prepare_example,
    segment_oneshot,
    text_batch,
    train_oneshot,
    train_step,
    training_example,
)
from workers.methods.passes import grad_scaler
from workers.models.sd_ops import make_generator
from workers.models.stable_diffusion import StableDiffusion, resolve_device

PART_NAMES = ["green block", "blue half"]
LEARNING_RATE = 0.1  # train_oneshot's default
MIN_CROP = 0.7  # train_oneshot's default


def part_mask(height: int, width: int) -> np.ndarray:
    """(H, W) labels of the bench picture's regions (tests.support.image_bytes' layout)."""
    mask = np.zeros((height, width), dtype=np.int64)
    mask[:, width // 2 :] = 2
    mask[height // 2 :, width // 3 : 2 * width // 3] = 1
    return mask


class EpochClock:
    """train_oneshot's progress callback: the wall time of every epoch (training + any IoU check).

    train_oneshot's timer syncs CUDA before it reports, so an epoch's kernels end inside its span.
    """

    def __init__(self):
        self.started = time.perf_counter()
        self.epoch_ms: list[float] = []

    def __call__(self, **progress) -> None:
        now = time.perf_counter()
        self.epoch_ms.append((now - self.started) * 1000)
        self.started = now


def full_run(sd: StableDiffusion, image: np.ndarray, mask: np.ndarray, args) -> tuple[object, dict]:
    """Part 1: train_oneshot as the worker runs it; the model and its timings."""
    clock = EpochClock()
    with Stopwatch(sd.device) as watch:
        model = train_oneshot(
            sd,
            [image],
            [mask],
            PART_NAMES,
            epochs=args.run_epochs,
            resolution=args.resolution,
            seed=args.seed,
            report=clock,
        )
    timings = model.metrics["timings_ms"]
    evaluations = len(
        [e for e in range(1, args.run_epochs + 1) if e % model.metrics["evaluated_every"] == 0 or e == args.run_epochs]
    )
    return model, {
        "epochs": args.run_epochs,
        "wall_s": watch.seconds,
        "timings_ms": timings,
        "evaluations": evaluations,
        "epoch_ms": clock.epoch_ms,
        "training_ms_per_epoch": timings.get("training", 0.0) / args.run_epochs,
        "evaluation_ms_each": timings.get("evaluation", 0.0) / evaluations,
        "train_iou": model.metrics["train_iou"],
        "skipped_steps": model.metrics["skipped_steps"],
    }


def measured_epochs(sd: StableDiffusion, image: np.ndarray, mask: np.ndarray, args, meter: MemoryMeter) -> list[dict]:
    """Part 2: args.epochs training steps on one picture, each timed and metered alone.

    The same setup as train_oneshot (prompt outputs, fp32 part vectors, Adam, loss scaler, seeded
    augmentation and noise), without its periodic IoU checks.
    """
    num_classes = len(PART_NAMES) + 1
    grid = args.resolution // sd.vae_scale_factor
    base, uncond = part_prompt_outputs(sd, num_classes)
    pixels, labels = prepare_example(image, mask, args.resolution)
    vectors = base[1:num_classes].float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([vectors], lr=LEARNING_RATE)
    scaler = grad_scaler(sd)
    augmentation = torch.Generator().manual_seed(args.seed)
    generator = make_generator(sd, args.seed)
    epochs = []
    for step in range(args.epochs):
        example = training_example(
            pixels, labels, augmentation, step=step, resolution=args.resolution, grid=grid, min_crop=MIN_CROP
        )
        meter.reset()
        start_memory = meter.current()
        with Stopwatch(sd.device) as watch:
            result = train_step(
                sd, text_batch(base, uncond, vectors), example, generator, num_classes, optimizer, scaler
            )
        peak = meter.peak()
        epochs.append(
            {
                "ms": watch.seconds * 1000,
                "peak": peak,
                "extra": peak - start_memory,
                "timestep": example[2],
                "loss": result["loss"],
                "skipped": bool(result["skipped"]),
            }
        )
    return epochs


def segmentations(
    sd: StableDiffusion, model, pictures: list[np.ndarray], crops_per_side: int, args, meter: MemoryMeter
) -> list[dict]:
    """Part 3: segment_oneshot on each picture: timings_ms, wall ms, peak memory (bytes)."""
    results = []
    for picture in pictures:
        meter.reset()
        start_memory = meter.current()
        with Stopwatch(sd.device) as watch:
            out = segment_oneshot(
                sd, model, picture, crops_per_side=crops_per_side, seed=args.seed, resolution=args.resolution
            )
        peak = meter.peak()
        results.append(
            {
                "ms": dict(out.timings_ms),
                "wall_ms": watch.seconds * 1000,
                "peak": peak,
                "extra": peak - start_memory,
                "labels_found": sorted(out.scores),
            }
        )
    return results


def stat_row(name: str, values: list[float], meaning: str, **extra) -> dict:
    stats = summary(values)
    return {
        "row": name,
        "n": stats["n"],
        "p50 ms": stats["p50"],
        "mean ms": stats["mean"],
        "min ms": stats["min"],
        "max ms": stats["max"],
        **extra,
        "what": meaning,
    }


def memory_columns(results: list[dict]) -> dict:
    """The highest peak and peak-minus-start of some measured calls, in MiB."""
    return {"peak MiB": max(r["peak"] for r in results) / MIB, "+MiB": max(r["extra"] for r in results) / MIB}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, dtype_help="auto: fp16 on cuda (training under autocast), fp32 on cpu")
    parser.add_argument(
        "--run-epochs",
        type=int,
        help="epochs of the train_oneshot run, also the warm-up (default 1 on cpu, 200 on cuda)",
    )
    parser.add_argument("--epochs", type=int, help="training epochs measured alone (default 3 on cpu, 30 on cuda)")
    parser.add_argument(
        "--images", type=int, help="segmentation images per crops_per_side setting (default 2 on cpu, 20 on cuda)"
    )
    parser.add_argument("--crops", default="1,2", help="crops_per_side settings to measure")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    on_gpu = resolve_device(args.device).type == "cuda"
    for name, cpu_default, gpu_default in (("run_epochs", 1, 200), ("epochs", 3, 30), ("images", 2, 20)):
        if getattr(args, name) is None:
            setattr(args, name, gpu_default if on_gpu else cpu_default)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    info, sd, load, meter, (width, height) = start_run(args, "One-shot (SLiMe) benchmark")
    crops = [int(c) for c in args.crops.split(",") if c.strip()]
    print(
        f"run       1 training picture {width}x{height}, parts {PART_NAMES}, at {args.resolution} "
        f"(R={args.resolution // 8}); train_oneshot {args.run_epochs} epochs, then {args.epochs} epochs alone; "
        f"segment {args.images} images x crops_per_side {crops}; memory: {meter.method}"
    )

    image, *pictures = bench_images(1 + args.images, width, height)
    mask = part_mask(height, width)
    loaded = meter.current()
    meter.reset()
    model, run = full_run(sd, image, mask, args)
    run["peak_bytes"] = meter.peak()
    resident = meter.current()
    kind = "allocated on the GPU" if sd.device.type == "cuda" else "process RSS"
    print(
        f"resident  {loaded / MIB:.0f} MiB after loading, {resident / MIB:.0f} MiB after the train_oneshot run, "
        f"peak {run['peak_bytes'] / MIB:.0f} MiB during it ({kind}); "
        f"load average {[round(x, 2) for x in os.getloadavg()]}\n"
    )

    epochs = measured_epochs(sd, image, mask, args, meter)
    segmented = {c: segmentations(sd, model, pictures, c, args, meter) for c in crops}

    epoch_ms = [e["ms"] for e in epochs]
    rows = [
        stat_row(
            "train epoch",
            epoch_ms,
            "train_step alone: augment, VAE sample, UNet [uncond, learned] fwd+bwd with capture, loss, Adam",
            **memory_columns(epochs),
        )
    ]
    for c, results in segmented.items():
        rows.append(
            stat_row(
                f"segment {c}x{c}",
                [r["wall_ms"] for r in results],
                f"segment_oneshot, crops_per_side {c}: {c * c} x (VAE + UNet [uncond, learned])",
                **memory_columns(results),
            )
        )
        for stage in results[0]["ms"]:
            rows.append(stat_row(f"  {stage}", [r["ms"][stage] for r in results], "its timings_ms"))
    print_table(rows, ["row", "n", "p50 ms", "mean ms", "min ms", "max ms", "peak MiB", "+MiB", "what"])

    print(
        f"train_oneshot run     {run['epochs']} epochs in {run['wall_s']:.1f} s: training "
        f"{run['training_ms_per_epoch']:.0f} ms/epoch, {run['evaluations']} IoU checks of "
        f"{run['evaluation_ms_each']:.0f} ms each; epochs (ms, incl. checks) "
        f"{[round(ms) for ms in run['epoch_ms'][:12]]}{' ...' if len(run['epoch_ms']) > 12 else ''}"
    )
    print(
        f"epochs alone          {[round(ms) for ms in epoch_ms]} ms; t {[e['timestep'] for e in epochs]}; "
        f"s/epoch {summary(epoch_ms)['mean'] / 1000:.2f} (mean), skipped (fp16 overflow) "
        f"{sum(e['skipped'] for e in epochs)}"
    )
    for c, results in segmented.items():
        walls = [r["wall_ms"] for r in results]
        print(
            f"segment {c}x{c}           {len(walls) / (sum(walls) / 1000):.4f} images/s (1 / mean wall); "
            f"labels found {[r['labels_found'] for r in results]}"
        )
    print(f"load average now      {[round(x, 2) for x in os.getloadavg()]}")

    report = {
        "benchmark": "oneshot",
        "machine": info,
        "model": sd.describe(),
        "load": load,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "memory_method": meter.method,
        "loaded_bytes": loaded,
        "resident_bytes": resident,
        "train_oneshot_run": run,
        "rows": rows,
        "epochs": epochs,
        "segment": {
            str(c): {"images_per_s": len(r) / (sum(x["wall_ms"] for x in r) / 1000), "per_image": r}
            for c, r in segmented.items()
        },
        "load_average_end": os.getloadavg(),
    }
    write_json(report, args.json)
    return report


if __name__ == "__main__":
    main()
