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
result), and notification (finished_at -> the client has the answer; the long-poll checks every
0.2 s). The model is tiny, so the figures are the service's own, not SD's.

    python -m bench.bench_service                         # the default phases below
    python -m bench.bench_service --phases 1x1,2x8 --jobs 100 --json bench/service.json

A phase is WORKERSxCONCURRENCY[:POLL_S]: that many workers, that many clients each submitting a
job and waiting for it before the next (closed loop), and client polling every POLL_S seconds
instead of the long-poll. Workers are only ever added between phases, so list them ascending.
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx

from bench.common import machine_info, print_header, print_table, summary, write_json
from service.routers.jobs import FINAL
from tests.support import Stack, image_bytes, start_worker, wait_for
from workers.models.tiny_random import build_tiny_random

JOB_TIMEOUT_S = 120
WORKER_READY_TIMEOUT_S = 240


def parse_phase(text: str) -> dict:
    """'2x4' -> 2 workers, 4 clients, long-poll; '1x1:0.02' -> client polling every 0.02 s."""
    shape, _, poll = text.partition(":")
    workers, concurrency = (int(v) for v in shape.lower().split("x"))
    if workers < 1 or concurrency < 1:
        raise argparse.ArgumentTypeError(f"phase {text!r}: workers and concurrency must be >= 1")
    return {"name": text, "workers": workers, "concurrency": concurrency, "poll_s": float(poll) if poll else None}


def seconds_between(start_iso: str, end_iso: str) -> float:
    return (datetime.fromisoformat(end_iso) - datetime.fromisoformat(start_iso)).total_seconds()


def run_job(client: httpx.Client, image: bytes, fields: dict, poll_s: float | None) -> dict:
    """Submit one job, wait for its end; times in ms. `ok` is False for anything but a success."""
    started = time.perf_counter()
    response = client.post("/segment/unsupervised", files={"image": ("bench.png", image, "image/png")},
                           data=fields)
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
    return {"ok": True, "e2e": e2e_ms, "inference": timings["inference"], "overhead": e2e_ms - timings["inference"],
            "post": post_ms, "queue": timings["queue"], "worker_other": run_ms - timings["inference"],
            "rle": timings["encode"], "notify": (done_wall - finished_wall) * 1000}


def run_phase(base_url: str, phase: dict, jobs: int, max_seconds: float, image: bytes, fields: dict) -> dict:
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
                record = run_job(client, image, fields, phase["poll_s"])
                with lock:
                    records.append(record)

    started = time.perf_counter()
    with ThreadPoolExecutor(phase["concurrency"]) as pool:
        for future in [pool.submit(client_loop) for _ in range(phase["concurrency"])]:
            future.result()
    wall_s = time.perf_counter() - started
    ok = [r for r in records if r["ok"]]
    stats = {key: summary([r[key] for r in ok]) for key in
             ("e2e", "inference", "overhead", "post", "queue", "worker_other", "rle", "notify")} if ok else {}
    return {**phase, "jobs": len(records), "succeeded": len(ok), "failures": [r for r in records if not r["ok"]],
            "wall_s": wall_s, "jobs_per_s": len(ok) / wall_s, "stats": stats}


def phase_rows(results: list[dict]) -> tuple[list[dict], list[dict]]:
    headline, split = [], []
    for result in results:
        s = result["stats"]
        if not s:
            headline.append({"phase": result["name"], "jobs": result["jobs"], "ok": 0})
            continue
        poll = "long-poll" if result["poll_s"] is None else f"poll {result['poll_s']} s"
        headline.append({"phase": result["name"], "workers": result["workers"], "clients": result["concurrency"],
                         "wait": poll, "ok": result["succeeded"], "jobs/s": round(result["jobs_per_s"], 2),
                         "e2e p50": s["e2e"]["p50"], "e2e p99": s["e2e"]["p99"],
                         "inference p50": s["inference"]["p50"],
                         "overhead p50": s["overhead"]["p50"], "overhead p99": s["overhead"]["p99"]})
        split.append({"phase": result["name"], **{f"{key} p50": s[key]["p50"] for key in
                                                 ("post", "queue", "worker_other", "rle", "notify")},
                      "queue p99": s["queue"]["p99"], "notify p99": s["notify"]["p99"]})
    return headline, split


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", type=lambda text: [parse_phase(p) for p in text.split(",")],
                        default=[parse_phase(p) for p in ("1x1", "1x1:0.01", "1x4", "2x4")],
                        help="comma-separated WORKERSxCLIENTS[:POLL_S] (default 1x1,1x1:0.01,1x4,2x4)")
    parser.add_argument("--jobs", type=int, default=100, help="jobs per phase (default 100)")
    parser.add_argument("--max-seconds", type=float, default=60, help="stop submitting in a phase after this")
    parser.add_argument("--warmup", type=int, default=3, help="jobs before the first phase, not counted")
    parser.add_argument("--image-size", default="160x120", help="WIDTHxHEIGHT of the PNG sent")
    parser.add_argument("--resolution", type=int, default=256, help="working resolution of the jobs")
    parser.add_argument("--worker-threads", type=int, default=1,
                        help="OMP_NUM_THREADS of each worker (default 1; 0: torch's default, all cores)")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON ('-' for stdout)")
    args = parser.parse_args(argv)
    counts = [phase["workers"] for phase in args.phases]
    if counts != sorted(counts):
        parser.error("list the phases with ascending worker counts (workers are only added)")
    return args


def stop_on_sigterm(signum, frame):
    raise SystemExit(f"signal {signum}")  # unwinds through the finally that stops the stack


def main(argv=None) -> dict:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    image = image_bytes(width, height)
    fields = {"resolution": str(args.resolution), "seed": "1"}
    # torch's default (all cores per worker) oversubscribes a small shared box: OpenMP threads
    # that spin for a busy core made the tiny model 5-20x slower here, and that is not the service.
    threads = {} if args.worker_threads == 0 else {"OMP_NUM_THREADS": str(args.worker_threads)}
    info = machine_info()
    print_header("service benchmark (HTTP + Redis/RQ + tiny-random worker)", info)
    print(f"run       {args.jobs} jobs per phase (at most {args.max_seconds:.0f} s), {len(image)}-byte PNG "
          f"{width}x{height}, resolution {args.resolution}, {args.warmup} warm-up jobs, worker threads "
          f"{args.worker_threads or 'default'}, all on 127.0.0.1\n")

    results = []
    with tempfile.TemporaryDirectory(prefix="attnseg-bench-") as directory:
        stack = Stack(Path(directory))
        build_tiny_random(stack.cache_dir / "tiny-random")  # once, before workers race to build it
        try:
            stack.redis.start()
            stack.start_api()
            started = time.perf_counter()
            for phase in args.phases:
                while len(stack.workers) < phase["workers"]:
                    stack.workers.append(start_worker(stack.redis.url, stack.cache_dir,
                                                      stack.directory / "worker.log", **threads))
                    wait_for(lambda: stack.ready_workers() >= len(stack.workers), timeout=WORKER_READY_TIMEOUT_S,
                             message=f"{len(stack.workers)} ready workers")
                if not results and args.warmup:
                    print(f"stack ready in {time.perf_counter() - started:.1f} s; warming up")
                    run_phase(stack.base_url, {**phase, "concurrency": 1}, args.warmup, args.max_seconds,
                              image, fields)
                result = run_phase(stack.base_url, phase, args.jobs, args.max_seconds, image, fields)
                results.append(result)
                print(f"phase {phase['name']}: {result['succeeded']}/{result['jobs']} ok in "
                      f"{result['wall_s']:.1f} s")
        except BaseException:
            print(stack.logs())
            raise
        finally:
            stack.stop()
    print()
    headline, split = phase_rows(results)
    print("latency per job, ms (overhead = e2e - worker-reported inference)")
    print_table(headline, ["phase", "workers", "clients", "wait", "ok", "jobs/s", "e2e p50", "e2e p99",
                           "inference p50", "overhead p50", "overhead p99"])
    print("where the overhead goes, ms")
    print_table(split, ["phase", "post p50", "queue p50", "queue p99", "worker_other p50", "rle p50",
                        "notify p50", "notify p99"])
    failures = sum(len(r["failures"]) for r in results)
    if failures:
        print(f"{failures} jobs did not succeed: {[r['failures'][:3] for r in results if r['failures']]}")

    report = {"benchmark": "service", "machine": info, "settings": {
        "jobs": args.jobs, "max_seconds": args.max_seconds, "warmup": args.warmup, "image_size": args.image_size,
        "image_bytes": len(image), "resolution": args.resolution, "worker_threads": args.worker_threads},
        "phases": results}
    write_json(report, args.json)
    return report


if __name__ == "__main__":
    main()
