"""The reconciler: repairs what the broker cannot know about.

* A ``running`` job whose heartbeat is older than ``STALE_AFTER`` lost its worker (``kill -9``, a lost node). It
  is put back to ``queued`` and re-sent; the next claim resumes from its checkpoint. A job that was being
  cancelled is marked ``cancelled`` instead, and one that already used ``MAX_ATTEMPTS`` attempts is failed.
* A ``queued`` job last sent more than ``REQUEUE_QUEUED_AFTER`` seconds ago that is not waiting in the broker
  (Redis was flushed or lost the message) is re-sent.

A database outage stops every heartbeat, so after one the reconciler judges no heartbeat stale until it has reached
the database for ``STALE_AFTER`` seconds again (:class:`OutageGuard`): live workers keep computing through the outage
and heartbeat again when it is back, and do not lose an attempt to it.

Every change is a conditional update, so several reconcilers (one per worker) may run at once; a duplicate
message is harmless because claiming is atomic.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

from jobs.context import database
from jobs.db import is_unavailable, session_scope
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


class OutageGuard:
    """Remembers when a reconciler last failed to reach the database; stale heartbeats are judged only once it
    has reached it again for ``stale_after`` seconds (every worker had time to heartbeat again)."""

    def __init__(self, stale_after: float, clock=time.monotonic) -> None:  # type: ignore[no-untyped-def]
        self.stale_after = stale_after
        self.clock = clock
        self.last_failure: float | None = None

    def failed(self) -> None:
        """Record a pass that could not reach the database."""
        self.last_failure = self.clock()

    def may_judge_stale(self) -> bool:
        """True when no outage happened within the last ``stale_after`` seconds."""
        return self.last_failure is None or self.clock() - self.last_failure >= self.stale_after

    def run(self, settings: Settings, dispatcher: Dispatcher, **kwargs: bool) -> ReconcileReport | None:
        """One guarded pass: ``None`` (and the outage recorded) when the database is unavailable."""
        try:
            return reconcile(settings, dispatcher, judge_stale=self.may_judge_stale(), **kwargs)
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            if self.last_failure is None or self.clock() - self.last_failure > 60:
                log.warning("reconciler: database unavailable (%s); stale checks paused", type(exc).__name__)
            self.failed()
            return None


def reconcile(
    settings: Settings, dispatcher: Dispatcher, *, resend_all_queued: bool = False, judge_stale: bool = True
) -> ReconcileReport:
    """One reconciler pass (see the module docstring).

    Args:
        settings: thresholds and the database.
        dispatcher: where re-queued jobs are sent.
        resend_all_queued: re-send every queued job not waiting in the broker, whatever its age (used when an
            embedded worker starts: its in-memory queue is empty).
        judge_stale: look for running jobs with stale heartbeats (off right after a database outage).

    Returns:
        What was done.
    """
    report = ReconcileReport()
    sessions = database(settings).sessions
    now = utcnow()
    stale_before = now - timedelta(seconds=settings.stale_after)
    with session_scope(sessions) as s:
        repo = JobRepository(s)
        for job_id in repo.queued_cancel_requested():
            if repo.cancel_queued(job_id, now):
                report.cancelled.append(job_id)
        for job in repo.stale_running(stale_before) if judge_stale else ():
            # Read before the update: a bulk UPDATE also refreshes this in-session object (worker becomes None).
            worker, attempt, stage = job.worker, job.attempt, job.stage
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
                continue  # it heartbeated meanwhile, a cancel arrived, or another reconciler got it
            repo.add_event(
                JobEvent(
                    job_id=job.id,
                    attempt=attempt,
                    stage=stage or "load",
                    kind="log",
                    message=f"worker {worker or '(unknown)'} lost (last heartbeat {seen}); {note}",
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
        self.guard = OutageGuard(settings.stale_after)
        self._pass_lock = threading.Lock()

    def run(self) -> None:
        """Loop until :meth:`stop`; errors are logged and the loop continues."""
        interval = self.settings.reconcile_interval
        while not self._stop_event.wait(interval):
            try:
                with self._pass_lock:
                    self.guard.run(self.settings, self.dispatcher)
            except Exception:
                log.exception("reconciler pass failed")

    def hold_forks_during_passes(self) -> None:
        """Make ``fork`` in this process wait for the current pass to end.

        Celery's prefork pool forks a fresh job process after every job (``worker_max_tasks_per_child`` 1). A fork
        copies every lock as it stands; when it lands while this thread is inside a pass (importing a module on
        first use, holding the engine cache's lock, in a driver call), the child waits forever on a lock nobody in
        it will release, and the job stays ``queued`` (seen in tests/reliability: the first pass, 2 s after start,
        met the fork that followed a 1.9 s job). Passes are short; a fork waits at most one.
        """

        def reset_in_child() -> None:
            self._pass_lock = threading.Lock()  # the copy is held (taken by ``before``): the child gets a new one

        os.register_at_fork(  # look the lock up at each fork: a child replaces it
            before=lambda: self._pass_lock.acquire(),
            after_in_parent=lambda: self._pass_lock.release(),
            after_in_child=reset_in_child,
        )

    def stop(self) -> None:
        """Stop after the current pass."""
        self._stop_event.set()
