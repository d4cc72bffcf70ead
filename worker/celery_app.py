"""Celery app and tasks of the pruning-job worker.

Run one worker per accelerator, on the dedicated queue (``CELERY_QUEUE``, default ``lorashear``)::

    celery -A worker.celery_app worker --loglevel=INFO

Settings come from the environment (:class:`jobs.settings.Settings`); the Celery behaviour for multi-hour jobs
(late acks, reject on worker loss, prefetch 1, visibility timeout above the time limit) is in
:mod:`jobs.celeryconf`. The worker's parent process runs the reconciler thread (stale heartbeats, lost messages).
"""

from __future__ import annotations

import logging
import sys

from celery import signals

from jobs.celeryconf import RUN_JOB_TASK, make_celery
from jobs.dispatch import CeleryDispatcher
from jobs.reconcile import ReconcilerThread
from jobs.runner import run_job
from jobs.settings import get_settings

log = logging.getLogger("worker")

settings = get_settings()
if settings.embedded:
    raise RuntimeError("BROKER_URL is not set: the Celery worker needs a broker (the embedded mode needs no worker)")

app = make_celery(settings, main="lorashear-worker")


@app.task(name=RUN_JOB_TASK, bind=True)
def run_job_task(self, job_id: str) -> str:  # type: ignore[no-untyped-def]
    """Run job ``job_id`` (claim, pipeline, terminal state); a duplicate delivery does nothing."""
    return run_job(job_id, settings=settings).value


_reconciler: ReconcilerThread | None = None


@signals.worker_ready.connect
def _start_reconciler(**_: object) -> None:
    """Start the reconciler in the worker's parent process (it re-queues jobs of dead workers)."""
    global _reconciler
    if "torch" in sys.modules:  # pragma: no cover - guards the "no CUDA in the parent" rule
        log.warning("torch was imported in the worker parent process; CUDA must stay out of it")
    if settings.reconcile_interval > 0 and _reconciler is None:
        _reconciler = ReconcilerThread(settings, CeleryDispatcher(settings))
        _reconciler.hold_forks_during_passes()  # the prefork pool must never fork mid-pass (see there)
        _reconciler.start()
        log.info("reconciler running every %.1f s", settings.reconcile_interval)


@signals.worker_shutdown.connect
def _stop_reconciler(**_: object) -> None:
    if _reconciler is not None:
        _reconciler.stop()
