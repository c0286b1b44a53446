"""`attnseg up`, the README's second command: Redis + API + worker, stopped cleanly by Ctrl-C."""

import re
import signal
import subprocess
import sys

import httpx
import pytest
import redis

from tests.support import ROOT, free_port, image_bytes, wait_until_ok, worker_env
from workers.models.tiny_random import build_tiny_random

pytestmark = pytest.mark.slow


def up_env(cache) -> dict:
    """The test worker's environment without ATTNSEG_REDIS_URL: `up` is told no Redis."""
    env = worker_env("unused", cache)
    del env["ATTNSEG_REDIS_URL"]
    return env


def test_up_starts_the_stack_on_its_own_redis_and_ctrl_c_stops_everything(tmp_path):
    cache = tmp_path / "cache"
    build_tiny_random(cache / "tiny-random")
    port = free_port()
    log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "cli", "up", "--model", "tiny-random", "--port", str(port)],
        cwd=ROOT,
        env=up_env(cache),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ok(f"{base}/readyz", timeout=240, message="the stack to be ready")
        said = re.search(r"redis: (redis://127\.0\.0\.1:(\d+)/0), started here", (tmp_path / "up.log").read_text())
        assert said and said.group(2) != "6379", (tmp_path / "up.log").read_text()[-3000:]  # its own, on a free port
        redis_url = said.group(1)
        job = httpx.post(
            f"{base}/segment/unsupervised",
            files={"image": ("i.png", image_bytes(64, 48), "image/png")},
            data={"resolution": "256"},
        ).json()
        done = httpx.get(f"{base}/jobs/{job['id']}", params={"wait": 60}, timeout=90).json()
        assert done["status"] == "succeeded", done
        assert (cache / "redis" / "appendonlydir").exists()  # the local Redis keeps an AOF
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(timeout=120)
    assert code == 0, (tmp_path / "up.log").read_text()[-3000:]
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{base}/healthz", timeout=2)
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(redis_url, socket_connect_timeout=1).ping()  # its Redis stopped with it
    leftover = subprocess.run(
        ["pgrep", "-f", f"--port {port}|{redis_url.split(':')[2].split('/')[0]}"], capture_output=True, text=True
    ).stdout.split()
    assert leftover == []


def test_up_given_a_redis_that_does_not_answer_says_so_and_starts_nothing(tmp_path):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    done = subprocess.run(
        [sys.executable, "-m", "cli", "up", "--redis-url", dead],
        cwd=ROOT,
        env=up_env(tmp_path / "cache"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"attnseg up: no Redis answers at {dead} (given by --redis-url or ATTNSEG_REDIS_URL)"


@pytest.mark.parametrize(
    "flag,environment,expected",
    [
        (None, {}, None),  # nobody named one: `up` starts its own
        (None, {"ATTNSEG_REDIS_URL": "redis://h:1/2"}, "redis://h:1/2"),
        ("redis://f:3/0", {"ATTNSEG_REDIS_URL": "redis://h:1/2"}, "redis://f:3/0"),
    ],
)
def test_up_writes_only_into_a_redis_it_was_told_of(monkeypatch, tmp_path, flag, environment, expected):
    from argparse import Namespace

    from attnseg.settings import Settings
    from cli.main import given_redis_url

    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.delenv("ATTNSEG_REDIS_URL", raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert given_redis_url(Namespace(redis_url=flag), Settings()) == expected


def test_worker_with_missing_weights_exits_with_a_clear_message(tmp_path):
    env = worker_env(
        f"redis://127.0.0.1:{free_port()}/0", tmp_path / "cache", ATTNSEG_SD_MODEL=str(tmp_path / "no-such-model")
    )
    done = subprocess.run(
        [sys.executable, "-m", "cli", "worker"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("attnseg worker:") and "no-such-model" in last and "ATTNSEG_SD_MODEL" in last
