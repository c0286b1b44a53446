"""Concepts and referring segmentation (POST /concepts/train, POST /segment/referring) on the real
SD 1.5 architecture (random weights cost what trained ones cost).

Two parts:
  1. `workers.methods.concepts.train_concept` on --photos photos, Custom Diffusion (embedding +
     to_k/to_v of the 16 cross-attention layers) and Textual Inversion (embedding alone), --steps
     steps each at --batch-size: seconds per step (from the progress callback, first step apart: it
     pays for lazy initialisation) and the peak memory of the run.
  2. `workers.methods.referring.segment_referring` with the trained Custom Diffusion concept and two
     queries (one with the identifier, one without: two UNet passes plus the area pass) on
     --images pictures: wall time, images/s, peak memory.

    python -m bench.bench_concepts                             # CPU here: 2 steps, 1 image
    python -m bench.bench_concepts --device cuda --steps 20 --images 10 --json bench/results/gpu_concepts.json
"""

from __future__ import annotations

import argparse
import time

from bench.common import MIB, Stopwatch, add_run_arguments, bench_images, print_table, start_run, summary, write_json
from workers.methods.concepts import train_concept
from workers.methods.referring import segment_referring

QUERIES = ["a <my-mug> mug", "a red mug"]


class StepClock:
    """train_concept's progress callback: the wall time of every step."""

    def __init__(self):
        self.last = time.perf_counter()
        self.seconds: list[float] = []

    def __call__(self, **progress) -> None:
        now = time.perf_counter()
        self.seconds.append(now - self.last)
        self.last = now


def training(sd, photos, train_kv: bool, args, meter) -> tuple[object, dict]:
    clock = StepClock()
    meter.reset()
    start_memory = meter.current()
    with Stopwatch(sd.device) as watch:
        clock.last = time.perf_counter()
        concept = train_concept(
            sd,
            photos,
            "my-mug",
            "mug",
            train_kv=train_kv,
            steps=args.steps,
            batch_size=args.batch_size,
            resolution=args.resolution,
            seed=0,
            report=clock,
        )
    peak = meter.peak()
    later = clock.seconds[1:] or clock.seconds
    return concept, {
        "row": "custom diffusion" if train_kv else "textual inversion",
        "steps": args.steps,
        "batch": args.batch_size,
        "first s": clock.seconds[0],
        "s/step": summary(later)["mean"],
        "wall s": watch.seconds,
        "peak MiB": peak / MIB,
        "extra MiB": (peak - start_memory) / MIB,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--photos", type=int, default=3, help="training photos (the API takes 3 to 20)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per method")
    parser.add_argument("--batch-size", type=int, default=1, help="photos per step (recipes: 2 CD, 4 TI)")
    parser.add_argument("--images", type=int, default=1, help="scenes for referring segmentation")
    args = parser.parse_args(argv)
    info, sd, load, meter, (width, height) = start_run(args, "Concepts and referring segmentation benchmark")
    photos = bench_images(args.photos, 512, 512)
    rows = []
    concept, row = training(sd, photos, True, args, meter)
    rows.append(row)
    rows.append(training(sd, photos, False, args, meter)[1])
    print_table(rows, ["row", "steps", "batch", "first s", "s/step", "wall s", "peak MiB", "extra MiB"])

    scenes = bench_images(args.images + 1, width, height)
    segment_referring(sd, scenes[-1], "mug", QUERIES, concepts={"my-mug": concept}, resolution=args.resolution)  # warm
    runs = []
    for scene in scenes[:-1]:
        meter.reset()
        start_memory = meter.current()
        with Stopwatch(sd.device) as watch:
            out = segment_referring(sd, scene, "mug", QUERIES, concepts={"my-mug": concept}, resolution=args.resolution)
        peak = meter.peak()
        runs.append(
            {
                "wall_s": watch.seconds,
                "peak": peak,
                "extra": peak - start_memory,
                "ms": out.timings_ms,
                "instances": out.instances,
            }
        )
    walls = [run["wall_s"] for run in runs]
    referring = {
        "row": "referring (2 queries)",
        "images": len(runs),
        "s/image": summary(walls)["mean"],
        "images/s": len(runs) / sum(walls),
        "peak MiB": max(r["peak"] for r in runs) / MIB,
        "extra MiB": max(r["extra"] for r in runs) / MIB,
    }
    print_table([referring], ["row", "images", "s/image", "images/s", "peak MiB", "extra MiB"])
    print("referring stages (ms, last image):", runs[-1]["ms"])
    report = {
        "machine": info,
        "model": args.model,
        "load": load,
        "resolution": args.resolution,
        "memory_method": meter.method,
        "training": rows,
        "referring": {**referring, "runs": runs},
    }
    write_json(report, args.json)
    return report


if __name__ == "__main__":
    main()
