"""Push, not poll: a worker's job-end signal wakes the requests waiting on that job, and only them."""

import asyncio

from attnseg.queue import publish_job_event
from service.job_events import JobEvents


def test_end_signal_wakes_the_waiters_of_that_job_only(redis_server):
    async def scenario():
        events = JobEvents(redis_server.url)
        events.start()
        try:
            while not events.listening:  # the subscription is up
                await asyncio.sleep(0.01)
            with events.watch("job-a") as a1, events.watch("job-a") as a2, events.watch("job-b") as b:
                publish_job_event(redis_server.client(), "job-a", "progress")  # progress does not end a wait
                publish_job_event(redis_server.client(), "job-a", "end")
                await asyncio.wait_for(asyncio.gather(a1.wait(), a2.wait()), timeout=10)
                assert not b.is_set()
            assert events._waiters == {}  # nothing left behind by finished waits
        finally:
            await events.stop()

    asyncio.run(scenario())


def test_progress_signal_wakes_only_the_waiters_that_asked_for_it(redis_server):
    async def scenario():
        events = JobEvents(redis_server.url)
        events.start()
        try:
            while not events.listening:
                await asyncio.sleep(0.01)
            with events.watch("job-a") as end_only, events.watch("job-a", progress=True) as watching:
                publish_job_event(redis_server.client(), "job-a", "progress")
                await asyncio.wait_for(watching.wait(), timeout=10)
                await asyncio.sleep(0.1)  # the same message has reached every waiter by now
                assert not end_only.is_set()
            assert events._waiters == {} and events._progress_waiters == {}
        finally:
            await events.stop()

    asyncio.run(scenario())


def test_progress_goes_out_in_one_round_trip_at_most_every_interval(redis_server, monkeypatch):
    import pytest
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from attnseg.queue import cancel_key, enqueue, job_events_channel
    from attnseg.settings import Settings
    from workers.engine import context

    connection = redis_server.client()
    connection.flushall()
    job = enqueue(connection, Settings(redis_url=redis_server.url), "unsupervised", {"params": {}, "image": {}})
    events = connection.pubsub()
    events.subscribe(job_events_channel(job.id))
    events.get_message(timeout=5)  # the subscription's confirmation

    def stored_stage() -> str:
        return Job.fetch(job.id, connection=connection, serializer=JSONSerializer).meta["progress"]["stage"]

    ctx = context.JobContext(job)
    ctx.report("encoding", 0.1)
    ctx.report("attention", 0.2)  # within the interval: kept in memory only
    assert stored_stage() == "encoding"
    assert events.get_message(timeout=5)["data"] == b"progress"
    monkeypatch.setattr(context, "PROGRESS_EVERY_S", 0.0)
    ctx.report("merging", 0.7)
    assert stored_stage() == "merging"
    connection.set(cancel_key(job.id), 1)
    with pytest.raises(context.JobCanceled):
        ctx.report("labels", 0.9)


def test_a_finished_job_shows_its_last_report_even_when_throttled(redis_server):
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from attnseg.queue import enqueue
    from attnseg.settings import Settings
    from workers.engine import context

    connection = redis_server.client()
    connection.flushall()
    job = enqueue(connection, Settings(redis_url=redis_server.url), "oneshot_train", {"params": {}, "model_id": "m"})
    ctx = context.JobContext(job)
    with context.job_outcome(ctx, "oneshot_train", {}):
        ctx.report("training", 0.5, epoch=1, epochs=2)
        ctx.report("training", 1.0, epoch=2, epochs=2)  # held back by the throttle...
    progress = Job.fetch(job.id, connection=connection, serializer=JSONSerializer).meta["progress"]
    assert progress["epoch"] == 2  # ...and written when the job ends
