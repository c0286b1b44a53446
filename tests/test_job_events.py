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

