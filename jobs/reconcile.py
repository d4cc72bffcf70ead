"""The reconciler: repairs what the broker cannot know about.

* A ``running`` job whose heartbeat is older than ``STALE_AFTER`` lost its worker (``kill -9``, a lost node). It
  is put back to ``queued`` and re-sent; the next claim resumes from its checkpoint. A job that was being
  cancelled is marked ``cancelled`` instead, and one that already used ``MAX_ATTEMPTS`` attempts is failed.
* A ``queued`` job last sent more than ``REQUEUE_QUEUED_AFTER`` seconds ago that is not waiting in the broker
  (Redis was flushed or lost the message) is re-sent.

Every change is a conditional update, so several reconcilers (one per worker) may run at once; a duplicate
message is harmless because claiming is atomic.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import timedelta

from jobs.context import database
from jobs.db import session_scope
from jobs.dispatch import Dispatcher
from jobs.models import JobEvent, utcnow
from jobs.repository import JobRepository
from jobs.settings import Settings
from jobs.states import ErrorCode, JobStatus

log = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    """Job ids touched by one pass."""

    requeued: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def reconcile(settings: Settings, dispatcher: Dispatcher, *, resend_all_queued: bool = False) -> ReconcileReport:
    """One reconciler pass (see the module docstring).

    Args:
        settings: thresholds and the database.
        dispatcher: where re-queued jobs are sent.
        resend_all_queued: re-send every queued job not waiting in the broker, whatever its age (used when an
            embedded worker starts: its in-memory queue is empty).

    Returns:
        What was done.
    """
    report = ReconcileReport()
    sessions = database(settings).sessions
    now = utcnow()
    stale_before = now - timedelta(seconds=settings.stale_after)
    with session_scope(sessions) as s:
        repo = JobRepository(s)
        for job in repo.stale_running(stale_before):
            seen = job.heartbeat_at.isoformat() if job.heartbeat_at else "never"
            if job.cancel_requested:
                target, note = JobStatus.CANCELLED, "cancelled (its worker was lost before it stopped)"
                error = None
            elif job.attempt >= settings.max_attempts:
                target = JobStatus.FAILED
                note = f"failed: worker lost on each of {job.attempt} attempts"
                error = {"code": ErrorCode.PLATFORM_ERROR.value, "type": "worker_lost", "message": note}
            else:
                target, note, error = JobStatus.QUEUED, f"re-queued for attempt {job.attempt + 1}", None
            if not repo.release_stale(job.id, stale_before, target, now, error):
                continue  # it heartbeated meanwhile, or another reconciler got it
            repo.add_event(
                JobEvent(
                    job_id=job.id,
                    attempt=job.attempt,
                    stage=job.stage or "load",
                    kind="log",
                    message=f"worker {job.worker} lost (last heartbeat {seen}); {note}",
                    metrics={},
                    data={"reconciler": target.value},
                    time=now,
                )
            )
            {JobStatus.QUEUED: report.requeued, JobStatus.CANCELLED: report.cancelled}.get(
                target, report.failed
            ).append(job.id)
        before = None if resend_all_queued else now - timedelta(seconds=settings.requeue_queued_after)
        queued = [j for j in repo.queued_before(before) if j not in report.requeued]
    pending = dispatcher.pending() if queued else set()
    lost = [j for j in queued if pending is None or j not in pending]
    to_send = report.requeued + lost
    sent = []
    for job_id in to_send:
        try:
            dispatcher.send(job_id)
            sent.append(job_id)
        except Exception:
            log.exception("reconciler: could not send job %s (it stays queued)", job_id)
    with session_scope(sessions) as s:
        JobRepository(s).mark_enqueued(sent, utcnow())
    report.resent = [j for j in lost if j in sent]
    if report.requeued or report.resent or report.cancelled or report.failed:
        log.info("reconciler: %s", report)
    return report


class ReconcilerThread(threading.Thread):
    """Runs :func:`reconcile` every ``RECONCILE_INTERVAL`` seconds until stopped (a daemon thread)."""

    def __init__(self, settings: Settings, dispatcher: Dispatcher) -> None:
        super().__init__(name="lorashear-reconciler", daemon=True)
        self.settings = settings
        self.dispatcher = dispatcher
        self._stop_event = threading.Event()

    def run(self) -> None:
        """Loop until :meth:`stop`; errors are logged and the loop continues."""
        interval = self.settings.reconcile_interval
        while not self._stop_event.wait(interval):
            try:
                reconcile(self.settings, self.dispatcher)
            except Exception:
                log.exception("reconciler pass failed")

    def stop(self) -> None:
        """Stop after the current pass."""
        self._stop_event.set()
