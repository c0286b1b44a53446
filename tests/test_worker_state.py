"""What a worker says about itself: busy in /readyz from a job's start to its end, and a cancel as
one INFO line (not an error with a traceback)."""

import logging

import numpy as np
from rq.serializers import JSONSerializer

from attnseg.queue import SEGMENT_QUEUE, cancel_key, get_queue
from attnseg.workers_registry import ready_workers
from tests.test_batch import pictures, submit
from workers.engine.worker import ModelWorker, Pulse


def worker_with_pulse(connection, settings) -> tuple[ModelWorker, Pulse]:
    ModelWorker.max_batch = 1
    worker = ModelWorker([get_queue(connection, SEGMENT_QUEUE)], connection=connection, serializer=JSONSerializer)
    pulse = Pulse(worker, {"name": "w1"}, settings)
    worker.on_state_change = pulse.announce
    return worker, pulse


def test_the_announcement_says_busy_while_a_job_runs_and_idle_at_its_end(worker_on):
    connection, settings, _ = worker_on
    worker, pulse = worker_with_pulse(connection, settings)
    pulse.beat()
    seen = [ready_workers(connection)[0]["state"]]
    announce = pulse.announce

    def watched():
        running = announce()
        seen.append(ready_workers(connection)[0]["state"])
        return running

    worker.on_state_change = watched
    job = submit(connection, settings, pictures(1)[0])
    worker.work(burst=True, with_scheduler=False)
    assert job.get_status() == "finished"
    assert seen == ["idle", "busy", "idle"]  # announced at the change, not at the next pulse


def test_a_canceled_job_is_one_info_line_in_the_log(worker_on, caplog):
    connection, settings, _ = worker_on
    worker, _ = worker_with_pulse(connection, settings)
    job = submit(connection, settings, np.full((40, 40, 3), 90, np.uint8))
    connection.set(cancel_key(job.id), 1)  # as DELETE /jobs/{id} does for a running job
    with caplog.at_level(logging.DEBUG):
        worker.work(burst=True, with_scheduler=False)
    assert job.get_meta(refresh=True).get("canceled") is True
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    mentions = [r for r in caplog.records if job.id in r.getMessage() and r.levelno >= logging.INFO]
    assert [(r.levelname, r.getMessage()) for r in mentions if "cancel" in r.getMessage()] == [
        ("INFO", f"job {job.id} canceled by request")
    ]
    assert not any("Traceback" in r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
