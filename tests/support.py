"""Test helpers: a private redis-server on a free loopback port, images, and a running stack."""

from __future__ import annotations

import functools
import io
import json
import math
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import redis
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """Our own redis-server (never the machine's shared one): started, restarted and stopped here."""

    def __init__(self, directory: Path, *, appendonly: bool = True):
        self.directory = directory
        self.port = free_port()
        self.appendonly = appendonly
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (.ci/run installs it)"
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
            "--maxmemory-policy",
            "noeviction",
            "--logfile",
            str(self.directory / "redis.log"),
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        for _ in range(100):
            try:
                if client.ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_connect_timeout=1)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


def image_bytes(width: int = 300, height: int = 200, fmt: str = "PNG", seed: int = 0) -> bytes:
    """A picture with a few flat regions (so segments have something to find), as file bytes."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = (200, 40, 40)
    pixels[:, width // 2 :] = (40, 60, 200)
    pixels[height // 2 :, width // 3 : 2 * width // 3] = (40, 180, 60)
    pixels = np.clip(pixels + rng.integers(-10, 10, pixels.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def safetensors_file(shapes: dict[str, list[int]], dtype: str = "F32") -> bytes:
    """A valid safetensors file of zeros (written by hand: the API side has no torch)."""
    itemsize = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "BOOL": 1, "U8": 1, "I64": 8, "C64": 8}[dtype]
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = itemsize * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return raw_safetensors(json.dumps(header).encode(), bytes(offset))


def raw_safetensors(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


@functools.cache
def deflate_bomb(members: tuple[tuple[str, bytes], ...] = (), data_bytes: int = 4 * 2**26) -> bytes:
    """A torch-style zip whose storage member `archive/data/0` is data_bytes of zeros, DEFLATE-compressed
    (the default: zeros(1, 2**26) in float32, 1.2 MB on disk, 256 MiB inflated), next to `members`
    (name, bytes) (a torch file's other members; by default a stand-in data.pkl)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, data in members or (("archive/data.pkl", b"\x80\x02}q\x00."),):
            archive.writestr(name, data)
        with archive.open("archive/data/0", "w", force_zip64=True) as member:
            chunk = bytes(4 * 2**20)
            for _ in range(data_bytes // len(chunk)):
                member.write(chunk)
    return buffer.getvalue()


def two_part_arrays(width: int = 96, height: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A two-colour picture and its class-id mask: parts 1 (left) and 2 (right) under a background band."""
    band = height // 6
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (220, 40, 40)
    pixels[:, width // 2 :] = (40, 60, 220)
    pixels[:band] = (20, 20, 20)
    mask = np.zeros((height, width), np.uint8)
    mask[band:, : width // 2] = 1
    mask[band:, width // 2 :] = 2
    return pixels, mask


AT_WORK: dict = {}  # job id -> what to do while a stand-in job runs (in this process's worker)


def stand_in(payload: dict):
    """A job function without a model: runs what a test put in AT_WORK while the job is started, then
    fails (`payload["fail"]`) or returns `payload["result"]`."""
    from rq import get_current_job

    action = AT_WORK.pop(get_current_job().id, None)
    if action is not None:
        action(get_current_job())
    if payload.get("fail"):
        raise RuntimeError("the stand-in job failed, as asked")
    return payload.get("result", {"segments": []})


def enqueue_stand_in(connection: redis.Redis, kind: str = "unsupervised", **payload):
    """A job of `kind` (as the API shows it, owned by tenant default) that runs `stand_in`."""
    from attnseg.queue import KINDS, get_queue

    meta = {"kind": kind, "params": {}, "owner": "default"}
    return get_queue(connection, KINDS[kind].queue).enqueue_call(
        f"{__name__}.stand_in", args=(payload,), meta=meta, result_ttl=600, failure_ttl=600
    )


def work_burst(connection: redis.Redis) -> None:
    """RQ's SimpleWorker runs every queued job, then returns (needs the main thread: signals)."""
    from rq import SimpleWorker
    from rq.serializers import JSONSerializer

    from attnseg.queue import QUEUES, get_queue

    queues = [get_queue(connection, name) for name in QUEUES]
    SimpleWorker(queues, connection=connection, serializer=JSONSerializer).work(burst=True, with_scheduler=False)


def worker_env(redis_url: str, cache_dir: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTNSEG_")}
    env.update(
        {
            "ATTNSEG_REDIS_URL": redis_url,
            "ATTNSEG_SD_MODEL": "tiny-random",
            "ATTNSEG_CLIP_MODEL": "tiny-random",
            "ATTNSEG_CACHE_DIR": str(cache_dir),
            "ATTNSEG_DEVICE": "cpu",
            "ATTNSEG_WORKER_HEARTBEAT_S": "1",
            "ATTNSEG_WORKER_LOST_AFTER_S": "5",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            **extra,
        }
    )
    return env


def start_worker(
    redis_url: str, cache_dir: Path, log_path: Path, command: tuple[str, ...] = ("cli", "worker"), **extra: str
) -> subprocess.Popen:
    """`python -m <command>` as a worker (the benchmark passes its own entry, bench.worker), with the
    test settings (worker_env) and `extra` ATTNSEG_* variables."""
    log = open(log_path, "ab")
    return subprocess.Popen(
        [sys.executable, "-m", *command],
        cwd=ROOT,
        env=worker_env(redis_url, cache_dir, **extra),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def wait_for(predicate, timeout: float, interval: float = 0.2, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}")


def wait_until_ok(url: str, timeout: float, message: str) -> None:
    """Until GET `url` answers 200: a server starting up (refused connections are retried)."""
    import httpx

    def ok() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ok, timeout=timeout, message=message)


class Stack:
    """Redis, the API (uvicorn, real HTTP) and workers as separate processes, like production."""

    def __init__(self, directory: Path, model: str = "tiny-random", **api_env: str):
        self.directory = directory
        self.model = model  # the workers' ATTNSEG_SD_MODEL: a model built locally on first use
        self.api_env = api_env  # extra ATTNSEG_* settings of the API process (e.g. ATTNSEG_API_KEY)
        self.redis = RedisServer(directory / "redis", appendonly=True)
        self.cache_dir = directory / "cache"
        self.api_port = free_port()
        self.api: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start_api(self) -> None:
        log = open(self.directory / "api.log", "ab")
        env = worker_env(self.redis.url, self.cache_dir, **self.api_env)
        self.api = subprocess.Popen(
            [sys.executable, "-m", "cli", "api", "--port", str(self.api_port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def start_ready(self, timeout: float = 240, worker_args: tuple[str, ...] = (), **worker_env: str) -> Stack:
        """Redis, the API and one worker; returns once the worker is ready (stopped, with logs, if not)."""
        from workers.models.stable_diffusion import load_stable_diffusion

        # Built (and loaded, a second) once here, before workers race to build it.
        load_stable_diffusion(self.model, device="cpu", dtype="float32", cache_dir=self.cache_dir)
        self.redis.start()
        self.start_api()
        self.start_worker(*worker_args, **worker_env)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 240, workers: int = 1) -> None:
        """Until `workers` workers are ready; the stack is stopped, and its logs raised, if not."""
        try:
            wait_for(lambda: self.ready_workers() >= workers, timeout=timeout, message="a ready worker")
        except AssertionError:
            self.stop()
            raise AssertionError(self.logs()) from None

    def restart_api(self) -> None:
        self.api.terminate()
        self.api.wait(timeout=10)
        self.start_api()

    def start_worker(self, *args: str, **env: str) -> subprocess.Popen:
        """`attnseg worker *args` with the stack's model and `env` ATTNSEG_* variables on top of the
        test settings."""
        log_path = self.directory / "worker.log"
        command = ("cli", "worker", *args)
        worker = start_worker(
            self.redis.url, self.cache_dir, log_path, command=command, **{"ATTNSEG_SD_MODEL": self.model, **env}
        )
        self.workers.append(worker)
        return worker

    def ready_workers(self) -> int:
        import httpx

        key = self.api_env.get("ATTNSEG_ADMIN_KEYS", "").split(",")[0] or self.api_env.get("ATTNSEG_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            return len(httpx.get(f"{self.base_url}/readyz", headers=headers, timeout=2).json()["workers"])
        except (httpx.HTTPError, ValueError, KeyError):
            return 0

    def logs(self) -> str:
        return "\n".join(
            (self.directory / name).read_text(errors="replace")[-4000:]
            for name in ("api.log", "worker.log")
            if (self.directory / name).exists()
        )

    def stop_workers(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                worker.terminate()
                try:
                    worker.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    worker.kill()
        self.workers = []

    def stop(self) -> None:
        self.stop_workers()
        if self.api and self.api.poll() is None:
            self.api.terminate()
            self.api.wait(timeout=10)
        self.redis.stop()
