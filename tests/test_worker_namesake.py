"""A worker restarted under its fixed name after a crash (real Redis, RQ's own worker records; no
torch): a stale record of that name is cleaned up at once and its running job failed as
`worker_lost` then, while a live namesake keeps its name and its job."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from datetime import timedelta

import httpx
import pytest
from rq import SimpleWorker
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.utils import now, utcformat

from attnseg.queue import SEGMENT_QUEUE, get_queue
from attnseg.settings import Settings
from service.job_view import job_view
from tests.support import Stack, enqueue_stand_in, image_bytes, wait_for
from workers.engine.namesake import free_the_name

LOST_AFTER_S = 600  # long: the job must fail because its worker is known dead, not by lapsing


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def worker_named(connection, name: str = "W") -> SimpleWorker:
    return SimpleWorker(
        [get_queue(connection, SEGMENT_QUEUE)], name=name, connection=connection, serializer=JSONSerializer
    )


def crashed_mid_job(connection, *, host: str, pid: int, silent_s: float = 0) -> Job:
    """A worker named W that registered, started a job and stopped without a word (SIGKILL)."""
    worker = worker_named(connection)
    worker.hostname, worker.pid = host, pid
    worker.register_birth()
    job = enqueue_stand_in(connection)
    worker.prepare_execution(job)
    worker.prepare_job_execution(job)
    connection.hset(worker.key, "last_heartbeat", utcformat(now() - timedelta(seconds=silent_s)))
    return job


def status_of(connection, job: Job) -> dict:
    fresh = Job.fetch(job.id, connection=connection, serializer=JSONSerializer)
    return job_view(connection, fresh, Settings(worker_lost_after_s=LOST_AFTER_S))


CRASHES = {
    "killed on this host": lambda: (socket.gethostname(), dead_pid(), 0),
    "restarted as the same pid (container pid 1)": lambda: (socket.gethostname(), os.getpid(), 0),
    "silent elsewhere for longer than the window": lambda: ("another-host", 4242, LOST_AFTER_S + 5),
}


@pytest.mark.parametrize("crash", list(CRASHES))
def test_a_stale_namesake_is_cleaned_up_and_its_job_failed_at_once(redis_server, crash):
    host, pid, silent_s = CRASHES[crash]()
    connection = redis_server.client()
    connection.flushall()
    job = crashed_mid_job(connection, host=host, pid=pid, silent_s=silent_s)
    assert status_of(connection, job)["status"] == "running"
    restarted = worker_named(connection)
    with pytest.raises(ValueError, match="active worker named 'W'"):  # what RQ does on its own
        restarted.register_birth()

    assert free_the_name(connection, "W", LOST_AFTER_S)
    failed = status_of(connection, job)
    assert failed["status"] == "failed" and failed["error"]["code"] == "worker_lost"
    restarted.register_birth()  # the name is free
    assert connection.hget(restarted.key, "pid").decode() == str(os.getpid())


@pytest.mark.parametrize("host", [socket.gethostname(), "another-host"])
def test_a_live_namesake_keeps_its_name_and_its_job(redis_server, host):
    """Alive: a process of that pid runs here (our parent), or elsewhere with a fresh heartbeat."""
    connection = redis_server.client()
    connection.flushall()
    job = crashed_mid_job(connection, host=host, pid=os.getppid())
    assert not free_the_name(connection, "W", LOST_AFTER_S)
    assert status_of(connection, job)["status"] == "running"
    assert not connection.hexists(worker_named(connection).key, "death")


def test_a_free_name_or_one_whose_worker_withdrew_is_free(redis_server):
    connection = redis_server.client()
    connection.flushall()
    assert free_the_name(connection, "W", LOST_AFTER_S)
    gone = worker_named(connection)
    gone.register_birth()
    gone.register_death()  # a worker that stopped cleanly
    assert free_the_name(connection, "W", LOST_AFTER_S)


@pytest.mark.slow
def test_attnseg_worker_restarted_under_its_name_after_sigkill_starts_at_once(tmp_path):
    """The issue's case end to end: `attnseg worker --name W` SIGKILLed mid-job and started again
    exited with "There exists an active worker named 'W' already" until the record lapsed."""
    window = {"ATTNSEG_WORKER_LOST_AFTER_S": str(LOST_AFTER_S)}  # far longer than the test waits
    stack = Stack(tmp_path).start_ready(worker_args=("--name", "W"), **window)
    try:
        with httpx.Client(base_url=stack.base_url, timeout=60) as http:
            files = {"image": ("i.png", image_bytes(300, 200), "image/png")}
            job = http.post("/segment/unsupervised", files=files, data={"resolution": "1024"}).json()
            wait_for(lambda: http.get(f"/jobs/{job['id']}").json()["status"] == "running", timeout=180, interval=0.05)
            crashed = stack.workers.pop()
            crashed.send_signal(signal.SIGKILL)
            crashed.wait()
            restarted = stack.start_worker("--name", "W", **window)
            failed = wait_for(
                lambda: (seen := http.get(f"/jobs/{job['id']}").json())["status"] == "failed" and seen,
                timeout=LOST_AFTER_S / 2,
                interval=0.5,
                message="the job to be failed when W restarts",
            )
            assert failed["error"]["code"] == "worker_lost"
            stack.wait_ready()
            assert restarted.poll() is None, stack.logs()
            files = {"image": ("i.png", image_bytes(64, 64), "image/png")}
            again = http.post("/segment/unsupervised", files=files, data={"resolution": "256"}).json()
            assert (
                wait_for(
                    lambda: (
                        (seen := http.get(f"/jobs/{again['id']}", params={"wait": 10}).json())["status"]
                        in ("succeeded", "failed")
                        and seen
                    ),
                    timeout=180,
                )["status"]
                == "succeeded"
            )
    finally:
        stack.stop()
