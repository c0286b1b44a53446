"""The whole service path with tiny-random: HTTP upload -> Redis/RQ -> worker -> result -> client.

Starts its own redis-server, the API (uvicorn) and tiny-random workers as separate processes on
127.0.0.1 (tests.support.Stack, as the end-to-end tests do), submits small images to
POST /segment/unsupervised and waits for each job the documented way (GET /jobs/{id}?wait=30,
repeated), or by polling every S seconds with ?wait=0. Everything it started is stopped at the end,
also after an error or Ctrl-C.

Per job: end-to-end latency (POST sent -> final status read by the client) and the worker-reported
inference time (timings_ms.inference: the model and method stages). overhead = e2e - inference:
the service's cost outside the model. Split into: POST (upload, decode, store, enqueue), queue
wait (started_at - enqueued_at), worker time outside inference (image fetch, RLE, saving the
result), and notification (finished_at -> the client has the answer; the worker's end message wakes
the long-poll). The model is tiny, so the figures are the service's own, not SD's.

    python -m bench.bench_service                         # the default phases below
    python -m bench.bench_service --phases 1x1,2x8 --jobs 100 --json bench/service.json

A phase is WORKERSxCONCURRENCY[:POLL_S][@WxH]: that many workers, that many clients each submitting a
job and waiting for it before the next (closed loop), client polling every POLL_S seconds instead of
the long-poll, and @WxH: a different JPEG picture of that size per job (photo-like content, quality
90) instead of re-sending one small PNG (which the store keeps by digest). Workers are only ever
added between phases, so list them ascending.

Per phase it also reports Redis commands per job (INFO commandstats deltas on the private Redis,
every client: API, workers, waiting requests) and, with --round-trips, the sequential round trips
per job in a separate short 1x1 phase (MONITOR: a client's commands less than 200 us apart count
as one round trip, as a pipeline's arrive together). From the workers' announcements (renewed every
second here): "model busy", the share of the phase the workers' model threads worked (the GPU's
utilisation on a GPU host), and "prefetched", the share of jobs whose picture was decoded before
the job started.

    python -m bench.bench_service --phases 1x1@640x480,1x1@4000x3000 --jobs 20 --round-trips 5
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
import redis
from PIL import Image

from bench import emulated_gpu
from bench.common import machine_info, print_header, print_table, summary, write_json
from service.routers.jobs import FINAL
from tests.support import Stack, image_bytes, start_worker, wait_for
from workers.models.stable_diffusion import DEFAULT_CACHE_DIR
from workers.models.tiny_random import build_tiny_random

JOB_TIMEOUT_S = 120
WORKER_READY_TIMEOUT_S = 240


def parse_phase(text: str) -> dict:
    """'2x4' -> 2 workers, 4 clients, long-poll; '1x1:0.02' -> client polling every 0.02 s;
    '1x1@640x480' -> a different 640x480 JPEG per job."""
    text_shape, _, picture = text.partition("@")
    shape, _, poll = text_shape.partition(":")
    workers, concurrency = (int(v) for v in shape.lower().split("x"))
    if workers < 1 or concurrency < 1:
        raise argparse.ArgumentTypeError(f"phase {text!r}: workers and concurrency must be >= 1")
    size = tuple(int(v) for v in picture.lower().split("x")) if picture else None
    return {
        "name": text,
        "workers": workers,
        "concurrency": concurrency,
        "poll_s": float(poll) if poll else None,
        "picture": size,
    }


def photo_jpeg(width: int, height: int, seed: int) -> bytes:
    """A photo-like JPEG (smooth shapes, texture, noise; quality 90): a different picture per seed."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.int16)
    noise = rng.integers(-12, 13, size=(height, 1, 1), dtype=np.int16) + rng.integers(
        -12, 13, size=(1, width, 3), dtype=np.int16
    )
    out = io.BytesIO()
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def pictures_for(phase: dict, count: int, small: bytes) -> list[tuple[str, bytes, str]]:
    """(filename, bytes, content type) per job: distinct JPEGs for a picture phase, else the one PNG."""
    if phase["picture"] is None:
        return [("bench.png", small, "image/png")]
    width, height = phase["picture"]
    return [("photo.jpg", photo_jpeg(width, height, seed), "image/jpeg") for seed in range(count)]


class RedisCounter:
    """Commands the private Redis executed between two reads (INFO commandstats), by command."""

    def __init__(self, url: str):
        self.client = redis.Redis.from_url(url)

    def snapshot(self) -> dict[str, int]:
        return {
            name.removeprefix("cmdstat_"): int(stats["calls"])
            for name, stats in self.client.info("commandstats").items()
        }

    @staticmethod
    def delta(before: dict, after: dict) -> dict[str, int]:
        return {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}


def cpu_seconds(stat: Path) -> float:
    """utime + stime from a /proc .../stat file (fields 14 and 15): a process's (all its threads) or
    one thread's (/proc/<pid>/task/<tid>/stat)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_cpu_seconds(pid: int) -> tuple[float, float]:
    """A worker's CPU seconds: its main thread (the model thread: passes, per-image method steps, RQ's
    own bookkeeping) and all its other threads (prefetch decode, RLE and saving, pulse)."""
    total = cpu_seconds(Path(f"/proc/{pid}/stat"))
    main = cpu_seconds(Path(f"/proc/{pid}/task/{pid}/stat"))
    return main, total - main


class ProcessMeter:
    """CPU seconds of the API, the workers (summed) and Redis, and the emulated GPU's busy seconds."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.client = redis.Redis.from_url(stack.redis.url)

    def snapshot(self) -> dict[str, float]:
        workers = [worker_cpu_seconds(worker.pid) for worker in self.stack.workers]
        return {
            "api": cpu_seconds(Path(f"/proc/{self.stack.api.pid}/stat")),
            "worker": sum(main + other for main, other in workers),
            "worker model thread": sum(main for main, _ in workers),
            "worker other threads": sum(other for _, other in workers),
            "redis": cpu_seconds(Path(f"/proc/{self.stack.redis.process.pid}/stat")),
            "gpu": float(self.client.get(emulated_gpu.BUSY_KEY) or 0),
        }


def count_round_trips(url: str, run) -> dict:
    """Run `run()` under MONITOR: commands and sequential round trips (a client's commands < 200 us
    apart are one trip), per client address, plus the command names seen."""
    monitor_client = redis.Redis.from_url(url)
    seen: list[dict] = []
    stop = threading.Event()

    def listen() -> None:
        with monitor_client.monitor() as monitor:
            for command in monitor.listen():
                seen.append(command)
                if stop.is_set():
                    return

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    time.sleep(0.3)
    run()
    stop.set()
    monitor_client.ping()  # one more command so the listener wakes and sees the stop
    thread.join(timeout=5)
    trips: dict[str, int] = {}
    commands: dict[str, int] = {}
    last: dict[str, float] = {}
    for command in seen:
        client = command.get("client_address", "?") + ":" + str(command.get("client_port", ""))
        commands[client] = commands.get(client, 0) + 1
        if command["time"] - last.get(client, -1.0) > 200e-6:
            trips[client] = trips.get(client, 0) + 1
        last[client] = command["time"]
    return {
        "commands": sum(commands.values()),
        "round_trips": sum(trips.values()),
        "by_client": {c: {"commands": commands[c], "round_trips": trips[c]} for c in commands},
    }


def fresh_activity(url: str, workers: int) -> dict[str, dict]:
    """Each worker's announcement, once all are newer than the call (workers announce every second)."""
    from attnseg.workers_registry import ready_workers

    called = datetime.now().astimezone()
    connection = redis.Redis.from_url(url)

    def fresh():
        announced = {w["name"]: w for w in ready_workers(connection)}
        if not any("announced_at" in w for w in announced.values()):
            return announced  # code before the overlap: no activity to wait for
        newer = [w for w in announced.values() if datetime.fromisoformat(w["announced_at"]) > called]
        return announced if len(newer) >= workers else None

    return wait_for(fresh, timeout=10, interval=0.1, message="fresh worker announcements")


def activity_delta(before: dict, after: dict, wall_s: float) -> dict:
    """Model-thread utilisation over the phase (mean over workers) and the prefetch hit share; None
    where the workers do not report them (code before the overlap)."""
    names = [name for name in after if after[name].get("model_busy_s") is not None]
    if not names:
        return {"model_busy": None, "prefetched": None}

    def grown(name, field):
        return after[name].get(field, 0) - before.get(name, {}).get(field, 0)

    busy = sum(grown(name, "model_busy_s") for name in names) / (len(names) * wall_s)
    hits, misses = sum(grown(n, "prefetch_hits") for n in names), sum(grown(n, "prefetch_misses") for n in names)
    return {"model_busy": busy, "prefetched": hits / (hits + misses) if hits + misses else None}


def seconds_between(start_iso: str, end_iso: str) -> float:
    return (datetime.fromisoformat(end_iso) - datetime.fromisoformat(start_iso)).total_seconds()


def run_job(client: httpx.Client, picture: tuple[str, bytes, str], fields: dict, poll_s: float | None) -> dict:
    """Submit one job, wait for its end; times in ms. `ok` is False for anything but a success."""
    started = time.perf_counter()
    response = client.post("/segment/unsupervised", files={"image": picture}, data=fields)
    post_ms = (time.perf_counter() - started) * 1000
    if response.status_code != 202:
        return {"ok": False, "status": f"HTTP {response.status_code}"}
    job_id = response.json()["id"]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        params = {"wait": 0 if poll_s else 30}
        job = client.get(f"/jobs/{job_id}", params=params).json()
        if job["status"] in FINAL or time.monotonic() > deadline:
            break
        if poll_s:
            time.sleep(poll_s)
    e2e_ms = (time.perf_counter() - started) * 1000
    done_wall = time.time()
    if job["status"] != "succeeded":
        return {"ok": False, "status": job["status"], "error": job.get("error")}
    timings = job["result"]["timings_ms"]
    run_ms = seconds_between(job["started_at"], job["finished_at"]) * 1000
    finished_wall = datetime.fromisoformat(job["finished_at"]).timestamp()
    fetch, labels = timings.get("fetch", 0.0), timings.get("labels", 0.0)
    return {
        "ok": True,
        "e2e": e2e_ms,
        "inference": timings["inference"],
        "overhead": e2e_ms - timings["inference"],
        "post": post_ms,
        "queue": timings["queue"],
        "worker_other": run_ms - timings["inference"],
        "fetch": fetch,
        "model": timings["inference"] - labels,
        "labels": labels,
        "rle": timings["encode"],
        "save": run_ms - timings["inference"] - fetch - timings["encode"],
        "notify": (done_wall - finished_wall) * 1000,
    }


STAGES = (
    "e2e",
    "inference",
    "overhead",
    "post",
    "queue",
    "worker_other",
    "fetch",
    "model",
    "labels",
    "rle",
    "save",
    "notify",
)


def run_phase(
    base_url: str,
    phase: dict,
    jobs: int,
    max_seconds: float,
    pictures: list,
    fields: dict,
    counter: RedisCounter | None = None,
    activity: Callable[[], dict] | None = None,
    processes: ProcessMeter | None = None,
) -> dict:
    """`concurrency` clients in a closed loop until `jobs` jobs are submitted or time is up."""
    lock = threading.Lock()
    submitted = 0
    records: list[dict] = []
    deadline = time.monotonic() + max_seconds

    def client_loop() -> None:
        nonlocal submitted
        with httpx.Client(base_url=base_url, timeout=60) as client:
            while True:
                with lock:
                    if submitted >= jobs or time.monotonic() > deadline:
                        return
                    submitted += 1
                    picture = pictures[submitted % len(pictures)]
                record = run_job(client, picture, fields, phase["poll_s"])
                with lock:
                    records.append(record)

    before_activity = activity() if activity else {}
    before = counter.snapshot() if counter else {}
    cpu_before = processes.snapshot() if processes else {}
    started = time.perf_counter()
    with ThreadPoolExecutor(phase["concurrency"]) as pool:
        for future in [pool.submit(client_loop) for _ in range(phase["concurrency"])]:
            future.result()
    wall_s = time.perf_counter() - started
    cpu = {k: v - cpu_before[k] for k, v in processes.snapshot().items()} if processes else {}
    commands = RedisCounter.delta(before, counter.snapshot()) if counter else {}
    workers = activity_delta(before_activity, activity(), wall_s) if activity else {}
    ok = [r for r in records if r["ok"]]
    stats = {key: summary([r[key] for r in ok]) for key in STAGES} if ok else {}
    return {
        **phase,
        "jobs": len(records),
        "succeeded": len(ok),
        "failures": [r for r in records if not r["ok"]],
        "wall_s": wall_s,
        "jobs_per_s": len(ok) / wall_s,
        "stats": stats,
        "cpu_ms_per_job": {k: 1000 * v / max(1, len(ok)) for k, v in cpu.items() if k != "gpu"},
        "gpu_busy": cpu["gpu"] / (wall_s * phase["workers"]) if cpu.get("gpu") else None,
        **workers,
        "redis_commands_per_job": sum(commands.values()) / max(1, len(records)),
        "redis_commands": dict(sorted(commands.items(), key=lambda item: -item[1])),
    }


def phase_rows(results: list[dict]) -> tuple[list[dict], list[dict]]:
    headline, split = [], []
    for result in results:
        s = result["stats"]
        if not s:
            headline.append({"phase": result["name"], "jobs": result["jobs"], "ok": 0})
            continue
        poll = "long-poll" if result["poll_s"] is None else f"poll {result['poll_s']} s"
        headline.append(
            {
                "phase": result["name"],
                "workers": result["workers"],
                "clients": result["concurrency"],
                "wait": poll,
                "ok": result["succeeded"],
                "jobs/s": round(result["jobs_per_s"], 2),
                "e2e p50": s["e2e"]["p50"],
                "e2e p99": s["e2e"]["p99"],
                "inference p50": s["inference"]["p50"],
                "overhead min": s["overhead"]["min"],
                "overhead p50": s["overhead"]["p50"],
                "overhead p99": s["overhead"]["p99"],
                "redis cmds/job": round(result["redis_commands_per_job"], 1),
                "model busy": percent(result.get("model_busy")),
                "prefetched": percent(result.get("prefetched")),
            }
        )
        split.append(
            {
                "phase": result["name"],
                **{
                    f"{key} p50": s[key]["p50"]
                    for key in ("post", "queue", "fetch", "model", "labels", "rle", "save", "notify")
                },
                "notify p99": s["notify"]["p99"],
            }
        )
        cpu = result["cpu_ms_per_job"]
        split[-1].update({f"cpu {name}": cpu[name] for name in CPU_PARTS if name in cpu})
        split[-1]["gpu busy"] = percent(result.get("gpu_busy"))
    return headline, split


def percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--phases",
        type=lambda text: [parse_phase(p) for p in text.split(",")],
        default=[parse_phase(p) for p in ("1x1", "1x1:0.01", "1x4", "2x4")],
        help="comma-separated WORKERSxCLIENTS[:POLL_S] (default 1x1,1x1:0.01,1x4,2x4)",
    )
    parser.add_argument("--jobs", type=int, default=100, help="jobs per phase (default 100)")
    parser.add_argument("--max-seconds", type=float, default=60, help="stop submitting in a phase after this")
    parser.add_argument("--warmup", type=int, default=3, help="jobs before the first phase, not counted")
    parser.add_argument("--image-size", default="160x120", help="WIDTHxHEIGHT of the PNG sent")
    parser.add_argument("--resolution", type=int, default=256, help="working resolution of the jobs")
    parser.add_argument("--model", default="tiny-random", help="ATTNSEG_SD_MODEL of the workers (sd15-random...)")
    parser.add_argument(
        "--worker-threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS of each worker (default 1; 0: torch's default, all cores)",
    )
    parser.add_argument("--worker-device", default="cpu", help="ATTNSEG_DEVICE of the workers (cpu, cuda)")
    parser.add_argument(
        "--emulated-gpu",
        metavar="MS+MS",
        help="replace the model pass by bench/emulated_gpu.py: wall ms per batch + per image, e.g. 8+1",
    )
    parser.add_argument(
        "--max-batch",
        type=lambda text: [int(v) for v in text.split(",")],
        default=[None],
        help="comma-separated ATTNSEG_MAX_BATCH values: every phase runs with each (workers restarted)",
    )
    parser.add_argument(
        "--round-trips",
        type=int,
        default=0,
        metavar="N",
        help="after the phases, N more jobs one at a time under MONITOR: round trips per job",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON ('-' for stdout)")
    args = parser.parse_args(argv)
    counts = [phase["workers"] for phase in args.phases]
    if counts != sorted(counts):
        parser.error("list the phases with ascending worker counts (workers are only added)")
    return args


def stop_on_sigterm(signum, frame):
    raise SystemExit(f"signal {signum}")  # unwinds through the finally that stops the stack


def worker_options(args, max_batch: int | None) -> dict:
    """start_worker's keyword arguments: entry point and environment."""
    # torch's default (all cores per worker) oversubscribes a small shared box: OpenMP threads
    # that spin for a busy core made the tiny model 5-20x slower here, and that is not the service.
    extra = (
        {}
        if args.worker_threads == 0
        else {"OMP_NUM_THREADS": str(args.worker_threads), "ATTNSEG_TORCH_THREADS": str(args.worker_threads)}
    )
    extra.update(ATTNSEG_DEVICE=args.worker_device, ATTNSEG_SD_MODEL=args.model)
    if args.model != "tiny-random":  # built once in the usual cache (sd15-random: 4 GB), not per run
        extra["ATTNSEG_CACHE_DIR"] = os.environ.get("ATTNSEG_CACHE_DIR", str(DEFAULT_CACHE_DIR.expanduser()))
    if max_batch is not None:
        extra["ATTNSEG_MAX_BATCH"] = str(max_batch)
    if args.emulated_gpu:
        extra["ATTNSEG_BENCH_GPU_MS"] = args.emulated_gpu
    return {"command": ("bench.worker",), **extra}


def add_workers(stack: Stack, count: int, options: dict) -> None:
    while len(stack.workers) < count:
        stack.workers.append(start_worker(stack.redis.url, stack.cache_dir, stack.directory / "worker.log", **options))
        wait_for(
            lambda: stack.ready_workers() >= len(stack.workers),
            timeout=WORKER_READY_TIMEOUT_S,
            message=f"{len(stack.workers)} ready workers",
        )


def run_phases(stack: Stack, args, small: bytes, fields: dict) -> list[dict]:
    """Every phase with each max batch; the workers restart (and warm up) when the batch changes."""
    results = []
    counter, processes = RedisCounter(stack.redis.url), ProcessMeter(stack)
    for max_batch in args.max_batch:
        stack.stop_workers()
        warm = False
        for phase in args.phases:
            add_workers(stack, phase["workers"], worker_options(args, max_batch))
            pictures = pictures_for(phase, args.jobs, small)
            if not warm and args.warmup:
                warmup = [pictures_for({"picture": (64, 48)}, 1, small)[0]]
                run_phase(stack.base_url, {**phase, "concurrency": 1}, args.warmup, args.max_seconds, warmup, fields)
            warm = True
            name = phase["name"] + ("" if max_batch is None else f" b{max_batch}")
            activity = lambda: fresh_activity(stack.redis.url, len(stack.workers))  # noqa: E731
            result = run_phase(
                stack.base_url, phase, args.jobs, args.max_seconds, pictures, fields, counter, activity, processes
            )
            results.append({**result, "name": name, "max_batch": max_batch})
            print(f"phase {name}: {result['succeeded']}/{result['jobs']} ok in {result['wall_s']:.1f} s")
    return results


def measure_round_trips(stack: Stack, args, small: bytes, fields: dict) -> dict:
    pictures = pictures_for({"picture": (640, 480)}, args.round_trips, small)
    phase = parse_phase("1x1")
    trips = count_round_trips(
        stack.redis.url,
        lambda: run_phase(stack.base_url, phase, args.round_trips, args.max_seconds, pictures, fields),
    )
    return {"jobs": args.round_trips, **trips}


HEADLINE = [
    "phase",
    "workers",
    "clients",
    "wait",
    "ok",
    "jobs/s",
    "e2e p50",
    "e2e p99",
    "inference p50",
    "overhead min",
    "overhead p50",
    "overhead p99",
    "redis cmds/job",
    "model busy",
    "prefetched",
]
SPLIT = ["phase", *(f"{s} p50" for s in ("post", "queue", "fetch", "model", "labels", "rle", "save", "notify"))]
CPU_PARTS = ("api", "worker", "worker model thread", "worker other threads", "redis")
SPLIT += ["notify p99", *(f"cpu {name}" for name in CPU_PARTS), "gpu busy"]


def print_report(results: list[dict], round_trips: dict | None) -> None:
    headline, split = phase_rows(results)
    print("latency per job, ms (overhead = e2e - worker-reported inference)")
    print_table(headline, HEADLINE)
    print("per stage, ms: post = upload + checks + store + enqueue; fetch = image fetch + decode (worker); model =")
    print("inference minus labels; labels = argmax + relabel at picture size; rle; save = the rest of the worker's")
    print("run (result and status writes); notify = finished -> client has it; cpu = CPU ms per job of the API,")
    print("the workers (all threads, then the model thread and the others) and Redis (/proc utime + stime);")
    print("gpu busy = the emulated GPU's share of the phase")
    print_table(split, SPLIT)
    for result in results:
        top = ", ".join(
            f"{name} {calls / max(1, result['jobs']):.1f}"
            for name, calls in list(result["redis_commands"].items())[:12]
        )
        print(f"redis commands per job, {result['name']}: {result['redis_commands_per_job']:.1f} ({top})")
    if round_trips:
        jobs = round_trips["jobs"]
        per_job = {c: {k: round(v / jobs, 1) for k, v in n.items()} for c, n in round_trips["by_client"].items()}
        print(
            f"under MONITOR, {jobs} jobs one at a time: {round_trips['commands'] / jobs:.1f} "
            f"commands and {round_trips['round_trips'] / jobs:.1f} sequential round trips per job; "
            f"per client: {per_job}"
        )
    failures = sum(len(r["failures"]) for r in results)
    if failures:
        print(f"{failures} jobs did not succeed: {[r['failures'][:3] for r in results if r['failures']]}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    small = image_bytes(width, height)
    fields = {"resolution": str(args.resolution), "seed": "1"}
    info = machine_info()
    print_header(f"service benchmark (HTTP + Redis/RQ + {args.model} worker)", info)
    print(
        f"run       {args.jobs} jobs per phase (at most {args.max_seconds:.0f} s), {len(small)}-byte PNG "
        f"{width}x{height}, resolution {args.resolution}, {args.warmup} warm-up jobs, worker threads "
        f"{args.worker_threads or 'default'}, emulated GPU {args.emulated_gpu or 'off'}, all on 127.0.0.1\n"
    )
    round_trips = None
    with tempfile.TemporaryDirectory(prefix="attnseg-bench-") as directory:
        stack = Stack(Path(directory))
        if args.model == "tiny-random":
            build_tiny_random(stack.cache_dir / "tiny-random")  # once, before workers race to build it
        try:
            stack.redis.start()
            stack.start_api()
            results = run_phases(stack, args, small, fields)
            if args.round_trips:
                round_trips = measure_round_trips(stack, args, small, fields)
        except BaseException:
            print(stack.logs())
            raise
        finally:
            stack.stop()
    print()
    print_report(results, round_trips)
    settings = {k: getattr(args, k) for k in ("jobs", "max_seconds", "warmup", "image_size", "resolution", "model")}
    settings.update(
        image_bytes=len(small),
        worker_threads=args.worker_threads,
        emulated_gpu=args.emulated_gpu,
        max_batch=args.max_batch,
    )
    report = {
        "benchmark": "service",
        "machine": info,
        "settings": settings,
        "phases": results,
        "round_trips": round_trips,
    }
    write_json(report, args.json)
    return report


if __name__ == "__main__":
    main()
