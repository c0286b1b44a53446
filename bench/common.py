"""What every benchmark shares: the machine and versions header, percentiles, peak memory, output.

Run the benchmarks from the repository root as modules (`python -m bench.bench_unsupervised`), so
`tests.support` (the stack and test images) is importable.
"""

from __future__ import annotations

import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.support import image_bytes
from workers.models.stable_diffusion import DEFAULT_CACHE_DIR, StableDiffusion, load_stable_diffusion, resolve_device
from workers.models.tiny_random import build_random

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "diffusers", "transformers", "open_clip_torch", "rq", "redis", "fastapi", "uvicorn", "numpy")
MIB = 2**20


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _redis_server_version() -> str | None:
    binary = shutil.which("redis-server")
    if not binary:
        return None
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    version = next((word for word in out.split() if word.startswith("v=")), None)
    return version.removeprefix("v=") if version else out.strip() or None


def _git(*args: str) -> str | None:
    """Read-only git queries (commit, dirty flag) so a figure can be traced to its code."""
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_info() -> dict:
    """Machine, load, versions and code revision, for the header of every benchmark."""
    import torch

    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    versions["redis-server"] = _redis_server_version()
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
        }
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(_total_ram_bytes() / 2**30, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],  # other processes compete on a shared box
        "gpu": gpu,
        "platform": platform.platform(),
        "versions": versions,
        "commit": None if commit is None else commit + ("+dirty" if dirty else ""),
    }


def print_header(title: str, info: dict) -> None:
    gpu = info["gpu"]
    gpu_text = f"{gpu['name']} ({gpu['memory_gib']} GiB, x{gpu['count']}, CUDA {gpu['cuda']})" if gpu else "none"
    versions = ", ".join(f"{name} {version}" for name, version in info["versions"].items())
    print(f"== {title} ==")
    print(f"date      {info['date_utc']}   commit {info['commit']}")
    print(
        f"cpu       {info['cpu']}, {info['cores_usable']}/{info['cores']} cores usable, "
        f"torch threads {info['torch_threads']}, RAM {info['ram_gib']} GiB, load average {info['load_average']}"
    )
    print(f"gpu       {gpu_text}")
    print(f"versions  {versions}")
    print(f"platform  {info['platform']}")
    print()


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the two closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: list[float]) -> dict:
    """n, mean, min, p50, p90, p99, max of a sample (p99 of fewer than 100 values is near the max)."""
    return {
        "n": len(values),
        "mean": sum(values) / len(values),
        "min": min(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values),
    }


def _proc_status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def _can_reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class MemoryMeter:
    """Peak memory of a span of code, on the GPU or in this process's resident set.

    cuda: torch.cuda.max_memory_allocated since reset (tensors only; the caching allocator's
    reserve is higher). cpu: the kernel's resident-set high-water mark VmHWM, reset by writing 5
    to /proc/self/clear_refs (Linux >= 4.0), so it covers the span only; it counts every page
    the process touched (weights, allocator caches, libraries), so compare it with `current()`
    taken before the span. Where the reset is refused, ru_maxrss: the peak over the process's
    whole life (then spans cannot be told apart; `method` says so).
    """

    def __init__(self, device):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        if self.cuda:
            self.method = "torch.cuda.max_memory_allocated (reset per span)"
            self.resettable = True
        else:
            self.resettable = _can_reset_rss_peak()
            self.method = (
                "VmHWM after /proc/self/clear_refs reset (per span)"
                if self.resettable
                else "ru_maxrss (process lifetime, no reset)"
            )

    def reset(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.resettable:
            Path("/proc/self/clear_refs").write_text("5")

    def current(self) -> int:
        import torch

        if self.cuda:
            return torch.cuda.memory_allocated()
        return _proc_status_bytes("VmRSS") or 0

    def peak(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        if self.resettable:
            return _proc_status_bytes("VmHWM") or 0
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def synchronize(device) -> None:
    """Wait for queued GPU work, so a wall-clock time covers the kernels and not just their launch."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Stopwatch:
    """time.perf_counter() seconds of a `with` block, after a device sync on entry and exit."""

    def __init__(self, device):
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        synchronize(self.device)
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._started


def print_table(rows: list[dict], columns: list[str]) -> None:
    """rows as a fixed-width text table; floats with one decimal (three significant digits below 10)."""

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if 0 < abs(value) < 10 else f"{value:.1f}"
        return str(value)

    text = [[cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in text)) for i, column in enumerate(columns)]
    print("  ".join(column.ljust(width) for column, width in zip(columns, widths)).rstrip())
    for row, line in zip(rows, text):
        # numbers right-aligned, text left-aligned
        print(
            "  ".join(
                text_cell.ljust(width) if isinstance(row.get(column), str) else text_cell.rjust(width)
                for text_cell, width, column in zip(line, widths, columns)
            ).rstrip()
        )
    print()


def write_json(report: dict, destination: str | None) -> None:
    """--json: '-' prints the report to stdout, a path writes it there."""
    if destination is None:
        return
    text = json.dumps(report, indent=2, default=str)
    if destination == "-":
        print(text)
    else:
        Path(destination).write_text(text + "\n")
        print(f"wrote {destination}", file=sys.stderr)


SD15_RANDOM = "sd15-random"


def load_model(name: str, cache_dir: Path, device: str, dtype: str) -> tuple[StableDiffusion, dict]:
    """The model and how long building (first use of sd15-random only) and loading took."""
    timings = {}
    started = time.perf_counter()
    if name == SD15_RANDOM:
        source = build_random(cache_dir / SD15_RANDOM, "sd15")
        timings["build_s"] = time.perf_counter() - started
        started = time.perf_counter()
        sd = load_stable_diffusion(str(source), device=device, dtype=dtype)
    else:
        sd = load_stable_diffusion(name, device=device, dtype=dtype, cache_dir=cache_dir)
    synchronize(sd.device)
    timings["load_s"] = time.perf_counter() - started
    return sd, timings


def bench_images(count: int, width: int, height: int) -> list[np.ndarray]:
    """RGB uint8 pictures with a few flat regions and noise (the test suite's), one seed each."""
    return [
        np.asarray(Image.open(io.BytesIO(image_bytes(width, height, seed=seed))).convert("RGB"))
        for seed in range(count)
    ]


def add_run_arguments(parser, dtype_help: str = "auto: fp16 on cuda, fp32 on cpu") -> None:
    """The arguments every model benchmark takes."""
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="auto", help=dtype_help)
    parser.add_argument(
        "--model",
        default=SD15_RANDOM,
        help="sd15-random (default), tiny-random, a diffusers directory or a cached hub id",
    )
    parser.add_argument("--resolution", type=int, default=512, help="working size (R = resolution / 8)")
    parser.add_argument("--image-size", default="640x480", help="WIDTHxHEIGHT of the input pictures")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(os.environ.get("ATTNSEG_CACHE_DIR", DEFAULT_CACHE_DIR)).expanduser()
    )
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON ('-' for stdout)")


def add_batch_arguments(parser) -> None:
    """--batch B[,B...]: images/s when B images share one pass (the worker's cross-request batching)."""
    parser.add_argument(
        "--batch",
        type=lambda text: [int(v) for v in text.split(",")],
        default=[],
        metavar="B[,B...]",
        help="also measure images/s for these batch sizes (e.g. 1,2,4,8)",
    )
    parser.add_argument("--batch-repeats", type=int, default=2, help="timed batches per size (default 2)")


BATCH_COLUMNS = ["batch", "images/s best", "images/s median", "ms/image best", "ms/image median", "peak MiB"]


def batch_throughput(device, pictures: list[np.ndarray], sizes: list[int], repeats: int, run_batch) -> list[dict]:
    """images/s and peak memory of `run_batch(images)` (one shared pass + per-image steps) per batch size.

    One untimed batch per size first (shapes change with B), then `repeats` timed ones, each on
    different pictures; best and median reported (a shared CPU's load moves the median).
    """
    rows = []
    meter = MemoryMeter(device)
    for size in sizes:
        meter.reset()
        run_batch([pictures[i % len(pictures)] for i in range(size)])
        seconds = []
        for repeat in range(repeats):
            batch = [pictures[(repeat * size + i) % len(pictures)] for i in range(size)]
            with Stopwatch(device) as watch:
                run_batch(batch)
            seconds.append(watch.seconds)
        stats = summary(seconds)
        rows.append(
            {
                "batch": size,
                "images/s best": size / stats["min"],
                "images/s median": size / stats["p50"],
                "ms/image best": 1000 * stats["min"] / size,
                "ms/image median": 1000 * stats["p50"] / size,
                "runs": repeats,
                "peak MiB": meter.peak() / MIB,  # GPU: tensors at this batch size; CPU: the process's RSS
            }
        )
    return rows


def start_run(args, title: str):
    """Threads, the machine header, the model (built on first use) and a memory meter.

    Returns (machine info, model, load timings, meter, (width, height) of the pictures).
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print_header(title, info)
    sd, load = load_model(args.model, args.cache_dir, str(resolve_device(args.device)), args.dtype)
    meter = MemoryMeter(sd.device)
    print(
        f"model     {args.model}: {sd.model_id} ({'random weights' if sd.random_weights else 'trained weights'}), "
        f"{sd.device}, {str(sd.dtype).removeprefix('torch.')}; " + ", ".join(f"{k} {v:.1f}" for k, v in load.items())
    )
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    return info, sd, load, meter, (width, height)
