"""A second question about the same picture (issue 15 item 7): the first text query uploads a photo,
the second sends the first result's `image.id` with other classes.

Both go through the real API (in-process test client: the upload's checks, or the stored picture
read back by its id) and the real worker (in-process `ModelWorker`, one burst per query, so its latent
cache lives across the two), on our own redis-server. Per query: the job's run time (started ->
finished, from the job object) and the result's stages; the first pair is a warm-up, not counted.

    python -m bench.bench_reuse --threads 1 --runs 2      # sd15-random on CPU, 640x480 JPEG at 512
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import datetime
from pathlib import Path

from fastapi.testclient import TestClient
from rq.serializers import JSONSerializer

from attnseg.queue import SEGMENT_QUEUE, get_queue
from attnseg.settings import Settings
from bench.bench_service import photo_jpeg
from bench.common import add_run_arguments, print_table, start_run, summary, write_json
from service.app import create_app
from tests.support import RedisServer
from workers.engine import runtime
from workers.engine.worker import ModelWorker

STAGES = ("fetch", "latent", "unet", "propagate", "label")


def ask(client: TestClient, connection, **request) -> dict:
    """POST /segment/text (`request`: files and data, or json), one worker burst, the finished job."""
    response = client.post("/segment/text", **request)
    response.raise_for_status()
    worker = ModelWorker([get_queue(connection, SEGMENT_QUEUE)], connection=connection, serializer=JSONSerializer)
    worker.work(burst=True, with_scheduler=False, logging_level="WARNING")
    job = client.get(f"/jobs/{response.json()['id']}").json()
    if job["status"] != "succeeded":
        raise RuntimeError(f"the job did not succeed: {job['error']}")
    return job


def run_ms(job: dict) -> float:
    started, finished = (datetime.fromisoformat(job[name]) for name in ("started_at", "finished_at"))
    return round((finished - started).total_seconds() * 1000, 1)


def row(run: int, query: str, job: dict) -> dict:
    timings = job["result"]["timings_ms"]
    return {"run": run, "query": query, "job ms": run_ms(job), **{s: timings.get(s, "-") for s in STAGES}}


def ask_twice(client: TestClient, connection, picture: bytes, args) -> tuple[dict, dict]:
    fields = {"resolution": args.resolution, "seed": 1}
    first = ask(
        client,
        connection,
        files={"image": ("photo.jpg", picture, "image/jpeg")},
        data={"classes": json.dumps(args.classes), **{k: str(v) for k, v in fields.items()}},
    )
    second = ask(
        client, connection, json={"image_id": first["result"]["image"]["id"], "classes": args.others, **fields}
    )
    return first, second


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--runs", type=int, default=2, help="measured pairs of queries, after one warm-up pair")
    parser.add_argument("--classes", type=lambda t: t.split(","), default=["cat", "grass"])
    parser.add_argument("--others", type=lambda t: t.split(","), default=["dog", "tree", "sky"])
    args = parser.parse_args(argv)
    info, sd, load, _, (width, height) = start_run(args, "second query on the same picture (text, selfcross)")
    with tempfile.TemporaryDirectory() as scratch:
        server = RedisServer(Path(scratch) / "redis", appendonly=False).start()
        try:
            settings = Settings(redis_url=server.url, cache_dir=args.cache_dir)
            runtime.install(runtime.Runtime(settings, sd, None))
            client, connection = TestClient(create_app(settings)), server.client()
            rows = []
            for run in range(args.runs + 1):
                started = time.perf_counter()
                first, second = ask_twice(client, connection, photo_jpeg(width, height, seed=run), args)
                print(f"pair {run}{' (warm-up)' if run == 0 else ''}: {time.perf_counter() - started:.1f} s")
                if run:
                    rows += [row(run, "first (upload)", first), row(run, "second (image_id)", second)]
        finally:
            server.stop()
    print_table(rows, ["run", "query", "job ms", *STAGES])
    firsts = [r["job ms"] for r in rows if r["query"].startswith("first")]
    seconds = [r["job ms"] for r in rows if r["query"].startswith("second")]
    ratio = [s / f for f, s in zip(firsts, seconds)]
    print(f"\nsecond / first job time: {', '.join(f'{r:.2f}' for r in ratio)}")
    report = {"machine": info, "load": load, "rows": rows, "first": summary(firsts), "second": summary(seconds)}
    write_json(report, args.json)
    return report


if __name__ == "__main__":
    main()
