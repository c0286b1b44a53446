"""Prometheus metrics: HTTP requests, queue depth, ready workers and job durations (from Redis)."""

from __future__ import annotations

import logging
import time

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from attnseg.job_metrics import read_job_durations
from attnseg.queue import QUEUES, get_queue
from attnseg.workers_registry import ready_workers

log = logging.getLogger("attnseg.api")


class ClusterCollector:
    """Read at scrape time from Redis, so every API replica reports the same cluster state."""

    def __init__(self, connection):
        self.connection = connection

    def collect(self):
        try:
            depths = {name: get_queue(self.connection, name).count for name in QUEUES}
            workers = ready_workers(self.connection)
            durations = read_job_durations(self.connection)
        except redis.RedisError as exc:
            log.warning("metrics: redis unavailable: %s", exc)
            return
        depth = GaugeMetricFamily("attnseg_queue_depth", "Jobs waiting in each queue.", labels=["queue"])
        for name, count in depths.items():
            depth.add_metric([name], count)
        yield depth
        yield GaugeMetricFamily("attnseg_workers_ready", "Workers announcing themselves ready.", value=len(workers))
        busy = CounterMetricFamily(
            "attnseg_worker_model_busy_seconds",
            "Seconds each worker's model thread has worked (rate: its utilisation), as of its last announcement.",
            labels=["worker"],
        )
        for worker in workers:
            if worker.get("model_busy_s") is not None:
                busy.add_metric([worker["name"]], worker["model_busy_s"])
        yield busy
        hist = HistogramMetricFamily(
            "attnseg_job_duration_seconds", "Job run time in the worker.", labels=["kind", "outcome"]
        )
        for (kind, outcome), entry in sorted(durations.items()):
            buckets = [(str(bound), count) for bound, count in entry["buckets"]] + [("+Inf", entry["count"])]
            hist.add_metric([kind, outcome], buckets, entry["sum"])
        yield hist


class Metrics:
    def __init__(self, connection):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "attnseg_http_requests_total", "HTTP requests.", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "attnseg_http_request_duration_seconds",
            "HTTP request latency.",
            ["method", "route"],
            registry=self.registry,
        )
        self.registry.register(ClusterCollector(connection))


class MetricsMiddleware:
    """Counts requests by route template (not raw path: job ids would explode the label set)."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def tracking_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(scope["method"], path, str(status)).inc()
            self.metrics.latency.labels(scope["method"], path).observe(time.perf_counter() - start)
