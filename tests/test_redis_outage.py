"""A Redis outage longer than the workers' heartbeat interval (and than the connection's own retries),
with jobs queued and one running: the API answers 503 with Retry-After meanwhile, the worker waits
Redis out instead of exiting, and every accepted job ends once Redis is back."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.support import Stack, image_bytes, wait_for

pytestmark = pytest.mark.slow

OUTAGE_S = 12  # heartbeat 1 s and lost-after 5 s (tests.support.worker_env); connection retries ~5 s
FINAL = ("succeeded", "failed", "canceled")


def submit(http: httpx.Client, side: int, **fields) -> httpx.Response:
    picture = image_bytes(side, side)
    return http.post("/segment/unsupervised", files={"image": ("i.png", picture, "image/png")}, data=fields)


def status(http: httpx.Client, job_id: str) -> dict:
    return http.get(f"/jobs/{job_id}").json()


@pytest.fixture
def stack(tmp_path):
    stack = Stack(tmp_path).start_ready()
    yield stack
    stack.stop()


def test_the_worker_rides_out_a_redis_outage_and_every_accepted_job_ends(stack):
    with httpx.Client(base_url=stack.base_url, timeout=60) as http:
        running = submit(http, 300, resolution="1024").json()  # long enough to be running when Redis goes
        queued = [submit(http, 64, resolution="256").json() for _ in range(6)]
        wait_for(lambda: status(http, running["id"])["status"] == "running", timeout=180, interval=0.05)

        stack.redis.stop()
        down_since = time.monotonic()
        refused = submit(http, 64)
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0, refused.text
        polled = http.get(f"/jobs/{queued[0]['id']}")
        assert polled.status_code == 503 and "Retry-After" in polled.headers
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_since)))
        assert stack.workers[0].poll() is None, stack.logs()  # still there, waiting
        stack.redis.start()

        after = submit(http, 64, resolution="256")  # accepted again at once
        assert after.status_code == 202, after.text
        jobs = [running, *queued, after.json()]
        ended = {}

        def all_ended() -> bool:
            for job in jobs:
                if job["id"] not in ended and (seen := status(http, job["id"]))["status"] in FINAL:
                    ended[job["id"]] = seen
            return len(ended) == len(jobs)

        wait_for(all_ended, timeout=300, interval=0.5, message="every accepted job to end")
        assert stack.workers[0].poll() is None, stack.logs()
        for job in jobs[1:]:  # waiting in the queue through the outage, or sent after it
            assert ended[job["id"]]["status"] == "succeeded", ended[job["id"]]
        # The job that was running finished, or was failed cleanly (its outcome could not be stored).
        first = ended[running["id"]]
        assert first["status"] == "succeeded" or first["error"]["code"] in ("store_unavailable", "worker_lost"), first
        assert "found an unhandled exception, quitting" not in stack.logs()
