"""A worker started under a fixed name (`attnseg worker --name W`, e.g. a pod's or unit's name) after
its predecessor of that name crashed: RQ refuses to register a second live worker of one name, and
keeps a crashed one's record for minutes. The record is stale, and cleaned up here at once, when it
has had no heartbeat within the lost-worker window or its process on this host is gone; the jobs it
was running are failed as `worker_lost` at that moment (RQ's abandoned-job path) rather than when
their liveness entries lapse.
"""

from __future__ import annotations

import logging
import os
import socket

from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import now
from rq.worker import SimpleWorker

log = logging.getLogger("attnseg.worker")


def process_gone(host: str | None, pid: int | None) -> bool:
    """True when `pid` on `host` is certainly not running: `host` is this one and there is no such
    process, or it is this very process (a container restarted as pid 1 under the same hostname)."""
    if host != socket.gethostname() or not pid:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, under another user
        return False
    return False


def fail_running_jobs(namesake: SimpleWorker) -> list[str]:
    """Fail the jobs a dead worker was running, as RQ does for abandoned jobs (they read `worker_lost`):
    each one's liveness entry is made to lapse now, then its registry's cleanup runs. Returns their ids."""
    connection = namesake.connection
    failed = []
    for execution in namesake.get_current_executions(refresh=True):
        try:
            job = Job.fetch(execution.job_id, connection=connection, serializer=JSONSerializer)
        except NoSuchJobError:
            continue
        registry = StartedJobRegistry(job.origin, connection=connection, serializer=JSONSerializer)
        with connection.pipeline() as pipe:
            registry.add_execution(execution, pipe, ttl=0, xx=True)
            pipe.execute()
        registry.cleanup()
        failed.append(job.id)
    return failed


def free_the_name(connection, name: str, lost_after_s: int) -> bool:
    """Make the worker name `name` free to register: True when no live worker holds it (no record, a
    record RQ marked dead, or a stale one, now cleaned up), False while a live namesake does."""
    key = SimpleWorker.redis_worker_namespace_prefix + name
    if not connection.exists(key) or connection.hexists(key, "death"):
        return True
    namesake = SimpleWorker.find_by_key(key, connection=connection, serializer=JSONSerializer)
    if namesake is None:  # its record lapsed meanwhile
        return True
    beat = namesake.last_heartbeat
    silent = beat is None or (now() - beat).total_seconds() > lost_after_s
    if not (silent or process_gone(namesake.hostname, namesake.pid)):
        return False
    failed = fail_running_jobs(namesake)
    namesake.register_death()
    log.warning(
        "worker %s (host %s, pid %s) was gone: its record cleaned up, its jobs failed as worker_lost: %s",
        name,
        namesake.hostname,
        namesake.pid,
        ", ".join(failed) or "none",
    )
    return True
