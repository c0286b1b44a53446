"""Label map -> per-label COCO RLE (`rle.label_map_to_segments`): seconds and peak memory per map.

`--rle PATH` times another checkout's attnseg/rle.py too (before/after in one run).
    python -m bench.bench_rle --rle /work/main/attnseg/rle.py
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import numpy as np

from attnseg import rle
from bench.common import MIB, MemoryMeter, machine_info, print_header, print_table


def label_maps() -> dict[str, np.ndarray]:
    """Worst case (one-pixel checkerboard: a run per pixel) and ordinary maps (blocky labels)."""
    blocks = np.random.default_rng(0).integers(0, 6, size=(48, 64)).astype(np.int64)
    return {
        "checkerboard 4000x3000": (np.indices((3000, 4000)).sum(axis=0) % 2).astype(np.int64),
        "blocks 4000x3000": np.kron(blocks, np.ones((63, 63), np.int64))[:3000, :4000],
        "blocks 640x480": np.kron(blocks, np.ones((10, 10), np.int64))[:480, :640],
    }


def measure(encode, labels: np.ndarray, repeats: int) -> dict:
    meter = MemoryMeter("cpu")
    meter.reset()
    before = meter.current()
    seconds, cpu = [], []
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        encode(labels)
        seconds.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    return {
        "min_s": min(seconds),
        "median_s": statistics.median(seconds),
        "cpu_min_s": min(cpu),  # steadier than wall time on a shared machine
        "peak_mib": (meter.peak() - before) / MIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rle", help="another attnseg/rle.py to time beside this one")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    encoders = {"this tree": rle.label_map_to_segments}
    if args.rle:
        spec = importlib.util.spec_from_file_location("other_rle", args.rle)
        other = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(other)
        encoders[args.rle] = other.label_map_to_segments
    print_header("bench_rle: label map -> COCO RLE per label", machine_info())
    rows = []
    for case, labels in label_maps().items():
        for name, encode in encoders.items():
            rows.append({"map": case, "encoder": name, **measure(encode, labels, args.repeats)})
    print_table(rows, ["map", "encoder", "min_s", "median_s", "cpu_min_s", "peak_mib"])


if __name__ == "__main__":
    main()
