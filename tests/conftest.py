"""Shared fixtures. Heavy imports (torch, diffusers) stay inside the fixtures: the API tests run
without them."""

from __future__ import annotations

import os
from pathlib import Path

# Tests build their models locally; nothing may wait on the hub (CI has no route to it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """The tiny random SD pipeline (real SD 1.x topology, tiny widths), built once per session."""
    from workers.models.tiny_random import build_tiny_random

    return build_tiny_random(tmp_path_factory.mktemp("models") / "tiny-random")


@pytest.fixture(scope="session")
def tiny_sd(tiny_sd_dir):
    """tiny_sd_dir loaded like real weights, on CPU in fp32. Shared: do not modify its weights."""
    from workers.models.stable_diffusion import load_stable_diffusion

    return load_stable_diffusion(str(tiny_sd_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_colour(tmp_path_factory):
    """tiny-colour (weights constructed so that attention follows colour), built into a fresh cache
    and loaded by name like real weights, CPU fp32. Shared: do not modify its weights."""
    from workers.models.stable_diffusion import load_stable_diffusion

    cache = tmp_path_factory.mktemp("models-colour")
    return load_stable_diffusion("tiny-colour", device="cpu", dtype="float32", cache_dir=cache)


TEST_DEVICE = os.environ.get("ATTNSEG_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def gpu_mode():
    """Skips unless GPU mode is on (ATTNSEG_TEST_DEVICE=cuda) and torch sees a CUDA device."""
    import torch

    if TEST_DEVICE != "cuda":
        pytest.skip("GPU mode is off: run with ATTNSEG_TEST_DEVICE=cuda on a machine with CUDA")
    if not torch.cuda.is_available():
        pytest.skip("ATTNSEG_TEST_DEVICE=cuda but torch sees no CUDA device on this machine")


@pytest.fixture(scope="session", params=["cpu", "cuda"])
def half_sd(request, tiny_sd_dir):
    """tiny_sd_dir with fp16 weights, as a GPU worker loads it: on the CPU always (torch computes
    fp16 there too, so dtype slips and overflow show up without a GPU), on CUDA in GPU mode.
    Compare it with the fp32 CPU `tiny_sd`."""
    from workers.models.stable_diffusion import load_stable_diffusion

    if request.param == "cuda":
        request.getfixturevalue("gpu_mode")
    return load_stable_diffusion(str(tiny_sd_dir), device=request.param, dtype="float16")


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory):
    """The tiny random SD of the SD 2.x topology ("tiny-random-sd2"), CPU fp32. Do not modify it."""
    from workers.models.stable_diffusion import load_stable_diffusion

    return load_stable_diffusion(
        "tiny-random-sd2", device="cpu", dtype="float32", cache_dir=tmp_path_factory.mktemp("models-sd2")
    )


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """Our own redis-server on a free loopback port (never the machine's shared one)."""
    from tests.support import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis-api"), appendonly=False).start()
    yield server
    server.stop()


@pytest.fixture
def make_client(redis_server):
    """An API test client on a flushed private Redis (no worker), with small limits for the tests."""
    from fastapi.testclient import TestClient

    from attnseg.settings import Settings
    from service.app import create_app

    def make(**overrides):
        redis_server.client().flushall()  # our own server, started above
        settings = Settings(
            redis_url=redis_server.url, max_upload_bytes=2_000_000, max_image_pixels=1_000_000, **overrides
        )
        return TestClient(create_app(settings))

    return make


@pytest.fixture
def client(make_client):
    return make_client()


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """The tiny random CLIP (ViT-B/16 topology, tiny widths) on CPU in fp32, built once per session."""
    import torch

    from workers.models.clip import load_clip

    return load_clip("tiny-random", device="cpu", dtype=torch.float32, cache_dir=tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def shared_stack(tmp_path_factory):
    """Redis, the API and one tiny-random worker, started once for every test that only submits jobs
    (the client, the CLI). Tests that restart or kill parts of a stack keep their own."""
    from tests.support import Stack

    stack = Stack(tmp_path_factory.mktemp("shared-stack")).start_ready()
    yield stack
    stack.stop()


@pytest.fixture
def worker_on(redis_server, tiny_sd, tmp_path):
    """A ModelWorker in this process on the private Redis, with the tiny model as its runtime."""
    from rq.serializers import JSONSerializer

    from attnseg.queue import SEGMENT_QUEUE, get_queue
    from attnseg.settings import Settings
    from workers.engine import runtime
    from workers.engine.worker import ModelWorker

    connection = redis_server.client()
    connection.flushall()
    settings = Settings(redis_url=redis_server.url, cache_dir=tmp_path)
    runtime.install(runtime.Runtime(settings=settings, sd=tiny_sd, clip=None))

    def run(max_batch: int) -> ModelWorker:
        ModelWorker.max_batch = max_batch
        worker = ModelWorker([get_queue(connection, SEGMENT_QUEUE)], connection=connection, serializer=JSONSerializer)
        worker.work(burst=True, with_scheduler=False)
        return worker

    yield connection, settings, run
    runtime.install(None)
