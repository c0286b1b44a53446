"""Peak memory of the API process per request: one 6300x6300 PNG, training uploads of many pairs, and
the overlay of a job over a 6300x6300 PNG of one colour.

The API runs as its own process (`attnseg api`, as in production) on a private Redis; before each
request its resident-set high-water mark is reset (/proc/PID/clear_refs), after it VmHWM minus the
resident set before is the request's peak. The figure to compare it with is the largest decoded
picture of the request (W x H x 3 bytes): the API decodes one picture at a time and holds masks as
uint8, so the peak should stay a small multiple of it.

    python -m bench.bench_api_memory
    python -m bench.bench_api_memory --cases overlay --api-root /path/to/before   # one case, another checkout
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from attnseg import rle
from attnseg.images import store_bytes
from bench.common import MIB, ROOT, machine_info, print_header, print_table
from tests.support import RedisServer, enqueue_stand_in, free_port, wait_until_ok, work_burst, worker_env


def flat_picture(width: int, height: int, fmt: str) -> bytes:
    """A picture with a few flat regions: small as a file, large when decoded (like the issue's 116 KB PNG)."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (200, 40, 40)
    pixels[height // 3 :, width // 3 :] = (40, 60, 200)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def part_mask(width: int, height: int) -> bytes:
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : height // 2, width // 4 : width // 2] = 1
    buffer = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def status_bytes(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def measure(client: httpx.Client, pid: int, send) -> tuple[int, float, int]:
    """(peak bytes above the resident set before, seconds, HTTP status) of one request."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = status_bytes(pid, "VmRSS")
    started = time.perf_counter()
    response = send(client)
    seconds = time.perf_counter() - started
    return status_bytes(pid, "VmHWM") - before, seconds, response.status_code


def start_api(root: Path, redis: RedisServer, cache: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = worker_env(redis.url, cache, ATTNSEG_MAX_UPLOAD_BYTES=str(200 * MIB), ATTNSEG_MAX_QUEUED_JOBS="100000")
    env["PYTHONPATH"] = str(root)  # that checkout's code, whatever this process runs
    api = subprocess.Popen(
        [sys.executable, "-m", "cli", "api", "--port", str(port)],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    wait_until_ok(f"{base}/healthz", timeout=60, message="the API")
    return api, base


def one_colour_job(redis: RedisServer, side: int) -> tuple[str, bytes]:
    """A succeeded job over a one-colour PNG of side x side, its one segment the whole picture (as a
    worker finishes it, without a model); returns its id and the PNG."""
    picture = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), (120, 160, 200), np.uint8)).save(picture, format="PNG")
    connection = redis.client()
    image = {"key": store_bytes(connection, "default", picture.getvalue(), ttl_s=3600), "width": side, "height": side}
    whole = np.ones((side, side), bool)
    segment = {"id": 1, "label": None, "bbox": rle.bbox(whole), "segmentation": rle.encode(whole)}
    job = enqueue_stand_in(connection, image=image, result={"image": image, "segments": [segment]})
    work_burst(connection)
    return job.id, picture.getvalue()


def request_cases(args, redis: RedisServer) -> list[tuple]:
    """(name, send, body bytes, largest decoded picture bytes) of each request measured."""
    pair_w, pair_h = (int(v) for v in args.pair_size.split("x"))
    big_png, big_mask = flat_picture(6300, 6300, "PNG"), part_mask(6300, 6300)
    pair_image, pair_mask = flat_picture(pair_w, pair_h, "JPEG"), part_mask(pair_w, pair_h)
    overlay_job, one_colour = one_colour_job(redis, 6300)

    def train(count, image, mask):
        def send(client):
            files = [("images", (f"i{i}", image, "image/jpeg")) for i in range(count)]
            files += [("masks", (f"m{i}", mask, "image/png")) for i in range(count)]
            return client.post("/oneshot/train", files=files, data={"labels": "part"})

        return send

    cases = [
        ("segment, 1 PNG 6300x6300", segment(big_png), len(big_png), 6300 * 6300 * 3),
        ("train, 4 pairs 6300x6300", train(4, big_png, big_mask), 4 * (len(big_png) + len(big_mask)), 6300 * 6300 * 3),
        (
            f"train, {args.pairs} pairs {pair_w}x{pair_h}",
            train(args.pairs, pair_image, pair_mask),
            args.pairs * (len(pair_image) + len(pair_mask)),
            pair_w * pair_h * 3,
        ),
        (
            "overlay, 1 PNG 6300x6300 of one colour",
            lambda client: client.get(f"/jobs/{overlay_job}/overlay.png"),
            len(one_colour),
            6300 * 6300 * 3,
        ),
    ]
    return [case for case in cases if args.cases is None or any(word in case[0] for word in args.cases.split(","))]


def segment(picture: bytes):
    return lambda client: client.post("/segment/unsupervised", files={"image": ("x.png", picture, "image/png")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=32, help="training pairs in the many-pairs request")
    parser.add_argument("--pair-size", default="1024x768", help="WxH of each of those pairs")
    parser.add_argument("--api-root", type=Path, default=ROOT, help="checkout whose API to measure (for before/after)")
    parser.add_argument("--cases", help="comma-separated words: only the requests whose name has one (overlay,train)")
    args = parser.parse_args()

    print_header("API peak memory per request", machine_info())
    small = flat_picture(64, 64, "PNG")
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        redis = RedisServer(Path(directory) / "redis", appendonly=False).start()
        try:
            for name, send, body, decoded in request_cases(args, redis):  # a fresh API process per case
                api, base = start_api(args.api_root, redis, Path(directory) / "cache")
                try:
                    with httpx.Client(base_url=base, timeout=600) as client:
                        segment(small)(client)  # warm: first-request imports are not the request's
                        peak, seconds, status = measure(client, api.pid, send)
                finally:
                    api.terminate()
                    api.wait(timeout=30)
                rows.append(
                    {
                        "request": name,
                        "status": status,
                        "body MiB": body / MIB,
                        "largest decoded MiB": decoded / MIB,
                        "peak MiB": peak / MIB,
                        "peak / decoded": peak / decoded,
                        "seconds": seconds,
                    }
                )
        finally:
            redis.stop()
    print(f"API at {args.api_root}; peak = VmHWM after a clear_refs reset minus VmRSS before, one API per case")
    print_table(rows, ["request", "status", "body MiB", "largest decoded MiB", "peak MiB", "peak / decoded", "seconds"])


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
