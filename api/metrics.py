"""Prometheus metrics at ``/metrics`` (issue 8), with prometheus-client.

Two sources:

* **Request latency** (``lorashear_http_request_duration_seconds``, by method, route template and status class),
  observed in this API process by :class:`RequestMetrics`. For a stream (SSE, downloads) it is the time to the
  response headers, not the stream's length.
* **Jobs, queue and workers**, read from the database at scrape time by :class:`JobCollector`, so every API
  replica reports the same figures whatever process ran the jobs (Celery workers write the rows):
  ``lorashear_jobs{status}`` (gauge), ``lorashear_job_queue_wait_seconds`` (histogram of ``started_at -
  created_at`` over started jobs), ``lorashear_job_run_seconds{status}`` (histogram of ``finished_at -
  started_at`` over finished jobs), ``lorashear_worker_heartbeat_age_seconds{worker}`` (seconds since each
  worker with a running job last heartbeated) and ``lorashear_database_up`` (0 when the scrape could not read).

Scrapes are cached for :data:`CACHE_SECONDS` so a tight scrape interval cannot load the database.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobs.models import Job
from jobs.states import JobStatus

log = logging.getLogger("api")

CACHE_SECONDS = 5.0
WAIT_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)
"""Queue wait buckets, seconds (a job waits for a free GPU worker: seconds to hours)."""
RUN_BUCKETS = (10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 3 * 3600.0, 6 * 3600.0, 12 * 3600.0, 24 * 3600.0)
"""Run time buckets, seconds (a pipeline takes minutes on a small model, hours on a 7B one)."""
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Methods kept as labels; any other becomes ``other`` (bounded cardinality whatever clients send)."""
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _seconds(a: datetime | None, b: datetime | None) -> float | None:
    if a is None or b is None:
        return None
    return max(0.0, (a - b).total_seconds())


def _histogram(values: Iterable[float], buckets: tuple[float, ...]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative ``(le, count)`` buckets and the sum of ``values``."""
    counts = [0] * (len(buckets) + 1)
    total = 0.0
    for v in values:
        total += v
        for i, edge in enumerate(buckets):
            if v <= edge:
                counts[i] += 1
                break
        else:
            counts[-1] += 1
    cumulative: list[tuple[str, float]] = []
    acc = 0
    for edge, c in zip((*buckets, float("inf")), counts, strict=True):
        acc += c
        cumulative.append(("+Inf" if edge == float("inf") else repr(edge), float(acc)))
    return cumulative, total


class JobCollector(Collector):
    """Job, queue and worker figures read from the database (see the module docstring)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Metric]] | None = None

    def describe(self) -> Iterator[Metric]:
        """Nothing: registering must not query the database (it may not be migrated yet)."""
        return iter(())

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > CACHE_SECONDS:
                self._cached = (now, self._read())
            yield from self._cached[1]

    def _read(self) -> list[Metric]:
        up = GaugeMetricFamily("lorashear_database_up", "1 when the last scrape could read the job database")
        try:
            metrics = self._query()
        except SQLAlchemyError as exc:
            log.warning("metrics scrape could not read the database: %s", type(exc).__name__)
            up.add_metric([], 0.0)
            return [up]
        up.add_metric([], 1.0)
        return [up, *metrics]

    def _query(self) -> list[Metric]:
        with self.sessions() as s:
            by_status = dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            started = s.execute(select(Job.started_at, Job.created_at).where(Job.started_at.is_not(None))).all()
            finished = s.execute(
                select(Job.status, Job.finished_at, Job.started_at).where(
                    Job.finished_at.is_not(None), Job.started_at.is_not(None)
                )
            ).all()
            beats = s.execute(
                select(Job.worker, func.max(Job.heartbeat_at))
                .where(Job.status == JobStatus.RUNNING.value, Job.worker.is_not(None))
                .group_by(Job.worker)
            ).all()
        jobs = GaugeMetricFamily("lorashear_jobs", "Jobs by status", labels=["status"])
        for st in JobStatus:
            jobs.add_metric([st.value], float(by_status.get(st.value, 0)))

        wait = HistogramMetricFamily(
            "lorashear_job_queue_wait_seconds", "Seconds from submission to a worker starting the job"
        )
        b, total = _histogram((w for a, c in started if (w := _seconds(a, c)) is not None), WAIT_BUCKETS)
        wait.add_metric([], b, total)

        run = HistogramMetricFamily(
            "lorashear_job_run_seconds", "Seconds from a worker starting a job to its end", labels=["status"]
        )
        for st in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED):
            vals = (r for status, f, a in finished if status == st.value and (r := _seconds(f, a)) is not None)
            b, total = _histogram(vals, RUN_BUCKETS)
            run.add_metric([st.value], b, total)

        age = GaugeMetricFamily(
            "lorashear_worker_heartbeat_age_seconds",
            "Seconds since each worker with a running job last heartbeated",
            labels=["worker"],
        )
        now = datetime.now(timezone.utc)
        for worker, beat in beats:
            seconds = _seconds(now, beat)
            if seconds is not None:
                age.add_metric([str(worker)[:200]], seconds)
        return [jobs, wait, run, age]


class RequestMetrics:
    """ASGI middleware observing each HTTP request's latency (to the response start) by route template."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}
        observed = False

        def observe() -> None:
            nonlocal observed
            if observed:
                return
            observed = True
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "GET")
            method = method if method in METHODS else "other"  # a client must not grow the label set
            self.histogram.labels(method, template, f"{status['code'] // 100}xx").observe(time.perf_counter() - start)

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
                observe()
            await send(message)

        try:
            await self.app(scope, receive, wrapped)
        finally:
            observe()


def make_registry(sessions: sessionmaker[Session]) -> tuple[CollectorRegistry, Histogram]:
    """A registry of its own per app (tests build many apps in one process) with the job collector and the
    request latency histogram."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(JobCollector(sessions))
    latency = Histogram(
        "lorashear_http_request_duration_seconds",
        "Seconds from request to response start, by method, route template and status class",
        ["method", "route", "status"],
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    return registry, latency


def render(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format."""
    return generate_latest(registry)
