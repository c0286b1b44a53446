"""`attnseg up`, the README's second command: Redis + API + worker, stopped cleanly by Ctrl-C."""

import signal
import subprocess
import sys

import httpx
import pytest

from tests.support import ROOT, free_port, image_bytes, wait_until_ok, worker_env
from workers.models.tiny_random import build_tiny_random

pytestmark = pytest.mark.slow


def test_up_starts_the_stack_and_ctrl_c_stops_everything(tmp_path):
    cache = tmp_path / "cache"
    build_tiny_random(cache / "tiny-random")
    redis_url = f"redis://127.0.0.1:{free_port()}/0"  # nothing answers there: `up` starts its own redis-server
    port = free_port()
    log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "cli", "up", "--model", "tiny-random", "--port", str(port)],
        cwd=ROOT,
        env=worker_env(redis_url, cache),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ok(f"{base}/readyz", timeout=240, message="the stack to be ready")
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
    leftover = subprocess.run(
        ["pgrep", "-f", f"--port {port}|{redis_url.split(':')[2].split('/')[0]}"], capture_output=True, text=True
    ).stdout.split()
    assert leftover == []


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


def test_up_runs_the_demo_model_when_no_weights_are_configured_and_says_what_it_is(monkeypatch, tmp_path, capsys):
    from attnseg.settings import Settings
    from cli.main import up_model
    from workers.models.tiny_colour import NOTE

    monkeypatch.chdir(tmp_path)  # no .env here
    for name in ("ATTNSEG_SD_MODEL", "ATTNSEG_CLIP_MODEL", "ATTNSEG_API_HOST"):
        monkeypatch.delenv(name, raising=False)
    demo = {"ATTNSEG_SD_MODEL": "tiny-colour", "ATTNSEG_CLIP_MODEL": "tiny-random"}
    assert up_model(None, Settings(), 8123) == demo
    said = capsys.readouterr().out
    assert "tiny-colour" in said and NOTE in said and "http://127.0.0.1:8123/ui" in said
    assert up_model("tiny-random", Settings(), 8123)["ATTNSEG_SD_MODEL"] == "tiny-random"
    monkeypatch.setenv("ATTNSEG_SD_MODEL", "/models/sd-1-5")  # configured: used as it is, nothing said
    assert up_model(None, Settings(), 8123) == {}
    assert capsys.readouterr().out == ""
