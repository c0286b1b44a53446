"""Cancel and delete against every state a worker can leave a job in (real Redis and RQ's own
SimpleWorker running stand-in job functions; no torch): the API read the job as queued, then the
worker moved on before the cancel landed. Every answer is clean, a repeat answers the same, and a
job that ended keeps its outcome."""

from __future__ import annotations

import subprocess
import sys

import pytest
from rq.job import Job
from rq.serializers import JSONSerializer

from attnseg import concept_store
from attnseg.queue import cancel_key
from attnseg.settings import Settings
from service import records
from service.job_view import job_view
from service.records import cancel
from tests.support import AT_WORK, ROOT, enqueue_stand_in, work_burst


def drop_executions(job: Job) -> None:
    """What a worker finishing the job does between RQ's status read and its executions read."""
    for key in job.connection.keys(f"rq:execution:{job.id}:*"):
        job.connection.delete(key)


def stored_status(connection, job: Job) -> str | None:
    status = connection.hget(job.key, "status")
    return status.decode() if status is not None else None


SETTINGS = Settings()


def cancel_stale(stale: Job) -> None:
    cancel(stale.connection, stale, SETTINGS)


@pytest.mark.parametrize(
    "state, expected",
    [
        ("queued", "canceled"),
        ("canceled by another request", "canceled"),
        ("started", "finished"),
        ("started, its execution just removed", "finished"),
        ("finished", "finished"),
        ("failed", "failed"),
        ("gone", None),
    ],
)
def test_a_cancel_seen_queued_lands_cleanly_whatever_the_worker_did(client, redis_server, state, expected):
    connection = redis_server.client()
    job = enqueue_stand_in(connection, "concept_import", fail=state == "failed")
    stale = Job.fetch(job.id, connection=connection, serializer=JSONSerializer)  # what the API read: queued
    if state == "canceled by another request":
        cancel_stale(Job.fetch(job.id, connection=connection, serializer=JSONSerializer))
    elif state.startswith("started"):
        # The cancel lands while the job runs; the stand-in makes no progress report, so it finishes.
        prepare = drop_executions if "execution" in state else lambda running: None
        AT_WORK[job.id] = lambda running: (prepare(running), cancel_stale(stale))
        work_burst(connection)
        assert connection.exists(cancel_key(job.id))  # a real job stops at its next report
    elif state in ("finished", "failed"):
        work_burst(connection)
    elif state == "gone":
        connection.delete(job.key)

    cancel_stale(stale)
    cancel_stale(stale)  # a repeat changes nothing
    assert stored_status(connection, job) == expected
    if expected is None:
        assert not connection.exists(job.key)  # nothing written for a job that is gone


@pytest.mark.parametrize("fail", [False, True])
def test_deleting_a_concept_as_its_job_ends_deletes_it(client, redis_server, monkeypatch, fail):
    """The issue's trace: DELETE /concepts/{id} 10 ms after its import job failed was a 500 (RQ's
    cancel looked up an execution the worker had removed) and the concept stayed. Here the worker
    runs the job right after the API has read it as queued."""
    connection = redis_server.client()
    job = enqueue_stand_in(connection, "concept_import", fail=fail)
    concept = concept_store.create(
        connection,
        concept_store.new_concept_id(),
        owner="default",
        identifier="my-mug",
        class_word="mug",
        method="textual_inversion",
        status="importing",
        params={},
        job_id=job.id,
    )

    def read_then_the_worker_moves_on(*args):
        view = job_view(*args)
        if view["status"] == "queued":  # RQ's worker needs a main thread: this is the API's threadpool
            port = redis_server.port
            code = f"import redis; from tests.support import work_burst; work_burst(redis.Redis(port={port}))"
            run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True)
            assert run.returncode == 0, run.stderr.decode()
        return view

    monkeypatch.setattr(records, "job_view", read_then_the_worker_moves_on)
    first = client.delete(f"/concepts/{concept['id']}")
    assert first.status_code == 204, first.text
    assert client.delete(f"/concepts/{concept['id']}").status_code == 404
    assert client.get(f"/concepts/{concept['id']}").status_code == 404
    assert stored_status(connection, job) == ("failed" if fail else "finished")


@pytest.mark.parametrize("state", ["queued", "finished", "failed", "gone"])
def test_delete_job_answers_the_same_when_repeated(client, redis_server, state):
    connection = redis_server.client()
    job = enqueue_stand_in(connection, "concept_import", fail=state == "failed")
    if state in ("finished", "failed"):
        work_burst(connection)
    if state == "gone":
        connection.delete(job.key)
    answers = [client.delete(f"/jobs/{job.id}") for _ in range(3)]
    codes = {answer.status_code for answer in answers}
    assert codes == ({404} if state == "gone" else {200}), [a.text for a in answers]
    if state != "gone":
        shown = {answer.json()["status"] for answer in answers}
        assert shown == {{"queued": "canceled", "finished": "succeeded", "failed": "failed"}[state]}
