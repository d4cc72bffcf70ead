"""Waking workers: a job id goes to the broker (Celery on Redis) or to the embedded worker thread.

Dispatch only carries wake-ups; the database is the source of truth. A lost message is re-sent by the reconciler,
and a duplicate one is harmless because the task body claims the job row atomically.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import uuid
from typing import Protocol

from jobs.settings import Settings

log = logging.getLogger(__name__)


class Dispatcher(Protocol):
    """Sends job ids to workers."""

    def send(self, job_id: str) -> None:
        """Wake a worker for ``job_id``; raises when the broker is unreachable."""

    def pending(self) -> set[str] | None:
        """Job ids waiting in the broker (sent, not yet finished by a worker), or ``None`` when unknown."""

    def ping(self) -> None:
        """Raise when the broker (or the embedded worker) is not available."""

    def close(self) -> None:
        """Release connections and threads."""


class CeleryDispatcher:
    """Sends ``lorashear.run_job(job_id)`` by name to the dedicated queue; inspects the Redis queue."""

    def __init__(self, settings: Settings) -> None:
        from jobs.celeryconf import make_celery

        self.settings = settings
        self.app = make_celery(settings, main="lorashear-api")

    def send(self, job_id: str) -> None:
        """Send the task with the job id only; the task id starts with the job id (see :meth:`pending`)."""
        from jobs.celeryconf import RUN_JOB_TASK

        self.app.send_task(
            RUN_JOB_TASK, args=[job_id], queue=self.settings.celery_queue, task_id=f"{job_id}.{uuid.uuid4().hex[:12]}"
        )

    def _redis(self):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis.from_url(self.settings.broker_url, socket_timeout=5, socket_connect_timeout=5)

    def pending(self) -> set[str] | None:
        """Job ids of the messages waiting in the queue list.

        A message a worker has reserved is not counted: with ``acks_late`` and a prefetch of one, a worker reserves
        only the job it is about to claim, and a reserved message of a dead worker must not hide a lost job.
        """
        if not (self.settings.broker_url or "").startswith(("redis://", "rediss://")):
            return None
        client = self._redis()
        try:
            found: set[str] = set()
            for item in client.lrange(self.settings.celery_queue, 0, -1):
                found.update(_job_ids_in(item))
            return found
        finally:
            client.close()

    def queue_length(self) -> int:
        """Messages waiting in the dedicated queue (tests compare it before and after a rejected request)."""
        client = self._redis()
        try:
            return int(client.llen(self.settings.celery_queue))
        finally:
            client.close()

    def ping(self) -> None:
        """Redis ``PING`` through a short-timeout connection."""
        client = self._redis()
        try:
            client.ping()
        finally:
            client.close()

    def close(self) -> None:
        """Close the Celery producer pool."""
        self.app.close()


def _job_ids_in(item: bytes | str) -> set[str]:
    try:
        message = json.loads(item)
        task_id = message["headers"]["id"]
    except (ValueError, KeyError, TypeError):
        return set()
    return {str(task_id).split(".", 1)[0]}


class EmbeddedDispatcher:
    """An in-process worker thread that runs the task body for each job id it is sent, one at a time, and runs
    the reconciler every ``RECONCILE_INTERVAL`` seconds (it also picks up queued jobs left from a previous run)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._queue: queue.Queue[str] = queue.Queue()
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="lorashear-embedded-worker", daemon=True)
            self._thread.start()

    def send(self, job_id: str) -> None:
        """Queue a job id for the worker thread."""
        with self._lock:
            if job_id in self._pending:
                return
            self._pending.add(job_id)
        self._queue.put(job_id)

    def pending(self) -> set[str] | None:
        """Job ids queued or running in this process."""
        with self._lock:
            return set(self._pending)

    def ping(self) -> None:
        """Raise when the worker thread is not running."""
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the embedded worker thread is not running")

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread: a running job checkpoints at its next step and goes back to ``queued`` (the next start
        resumes it). Waits ``timeout`` seconds at most; after that the job's heartbeat goes stale instead."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        from jobs.reconcile import OutageGuard
        from jobs.runner import run_job

        interval = self.settings.reconcile_interval
        guard = OutageGuard(self.settings.stale_after)
        try:
            guard.run(self.settings, self, resend_all_queued=True)
        except Exception:
            log.exception("initial reconcile failed")
        while not self._stop.is_set():
            try:
                job_id = self._queue.get(timeout=interval if interval > 0 else 1.0)
            except queue.Empty:
                if interval > 0:
                    try:
                        guard.run(self.settings, self)
                    except Exception:
                        log.exception("reconcile failed")
                continue
            try:
                run_job(job_id, settings=self.settings, stopping=self._stop.is_set)
            except Exception:  # run_job records failures itself; this is a bug or the database being down
                log.exception("embedded worker: job %s raised", job_id)
            finally:
                with self._lock:
                    self._pending.discard(job_id)


def make_dispatcher(settings: Settings) -> Dispatcher:
    """The dispatcher for the settings: Celery when ``BROKER_URL`` is set, else the embedded thread (not started)."""
    if settings.embedded:
        return EmbeddedDispatcher(settings)
    return CeleryDispatcher(settings)
