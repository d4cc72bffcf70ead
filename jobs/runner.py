"""The task body: run one job to a terminal state. The Celery task and the embedded worker thread both call
:func:`run_job`.

1. Claim the row atomically (``queued -> running``, or a ``running`` row whose heartbeat is stale), attempt + 1.
   Anything else (finished, cancelled, held by a live worker, unknown) returns without doing anything, so a
   duplicate delivery is harmless.
2. A heartbeat thread refreshes ``heartbeat_at`` every ``HEARTBEAT_INTERVAL`` seconds. If another worker took the
   job over (this one was presumed dead), the run stops at the next step and writes nothing more.
3. ``lorashear.pipeline.run`` writes ``ARTIFACT_ROOT/<job id>/`` atomically and keeps checkpoints in
   ``WORK_ROOT/<job id>/``; a re-claimed job resumes from them. Each event becomes an event row, metric points and
   the job's progress; ``should_cancel`` reads the cancel flag from the database.
4. The job ends ``succeeded`` (summary, artifacts with sizes and digests), ``cancelled`` or ``failed`` with
   ``user_error`` / ``platform_error``, the specific error type, a message and the field at fault.

The pipeline is imported when the first job runs: importing this module does not import torch.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from jobs.artifacts import describe
from jobs.context import database
from jobs.db import is_unavailable, session_scope
from jobs.errors import snake_case
from jobs.models import Artifact, JobEvent, MetricPoint, utcnow
from jobs.repository import JobRepository, new_artifact_id
from jobs.settings import Settings, get_settings
from jobs.states import ErrorCode, JobStatus

log = logging.getLogger(__name__)


class Outcome(str, Enum):
    """What :func:`run_job` did."""

    SKIPPED = "skipped"  # not claimable: finished, cancelled, unknown, or held by a live worker
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"  # another worker took the job over while this one ran
    REQUEUED = "requeued"  # the worker is shutting down: checkpointed and put back in the queue


def worker_identity() -> str:
    """``host:pid:random`` naming this attempt's holder of the job."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def overall_fraction(stage: str, step: int, total: int) -> float:
    """Progress 0-1 over all pipeline stages, each stage weighted equally."""
    from lorashear.events import STAGES

    if stage not in STAGES:
        return 0.0
    within = min(1.0, step / total) if total > 0 else 0.0
    return (STAGES.index(stage) + within) / len(STAGES)


def _finite_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for name, value in (metrics or {}).items():
        try:
            v = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v):
            out[str(name)[:128]] = v
    return out


def _jsonable(value: Any) -> Any:
    """Best effort: make event data storable as JSON (paths and numpy scalars become strings / floats)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "item"):
        try:
            return _jsonable(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)


def path_redactor(settings: Settings, job_id: str) -> Callable[[str], str]:
    """A function that replaces the server's absolute paths in a text with job-relative names: the job's output
    directory becomes ``""`` (``/srv/artifacts/job_x/model`` -> ``model``), its work directory ``work``, and the
    model/data roots ``models``/``data``. Events and error messages go to clients; server paths must not."""
    roots = settings.roots()
    pairs = [
        (str(settings.artifacts_dir / job_id), ""),
        (str(settings.work_dir / job_id), "work"),
        (str(settings.artifacts_dir), "artifacts"),
        (str(settings.work_dir), "work"),
        (str(roots.model_root), "models"),
        (str(roots.data_root), "data"),
    ]
    pairs.sort(key=lambda p: len(p[0]), reverse=True)

    def redact(text: str) -> str:
        for prefix, name in pairs:
            if prefix and prefix in text:
                text = text.replace(prefix + os.sep, f"{name}/" if name else "").replace(prefix, name or ".")
        return text

    return redact


def _redacted(value: Any, redact: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redacted(v, redact) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v, redact) for v in value]
    return value


MAX_BACKLOG = 10_000
"""Events a worker buffers while the database does not answer; beyond it the oldest progress events are dropped
(stage boundaries and logs are kept)."""


def with_db_retry(fn: Callable[[], Any], *, what: str, tolerance: float, job_id: str) -> Any:
    """Call ``fn`` until it does not fail with an "unavailable" database error, for up to ``tolerance`` seconds
    (backoff 0.5 s doubling to 10 s); other errors, and the last unavailable one, propagate."""
    deadline = time.monotonic() + tolerance
    delay = 0.5
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_unavailable(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("job %s: database unavailable while %s (%s); retrying", job_id, what, type(exc).__name__)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


class _Attempt:
    """State of one attempt: the holder identity, the heartbeat thread, and whether the claim was lost.

    While the database does not answer, the attempt keeps computing: events and progress are buffered in order
    and written when it is back (by the next event or heartbeat), ``should_cancel`` answers from the last flag
    read, and the final write is retried (``DB_OUTAGE_TOLERANCE``).
    """

    def __init__(
        self, settings: Settings, job_id: str, attempt: int, worker: str, stopping: Callable[[], bool] | None
    ) -> None:
        self.settings = settings
        self.stopping = stopping
        self.job_id = job_id
        self.attempt = attempt
        self.worker = worker
        self.sessions = database(settings).sessions
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)
        self.stage = "load"
        self.redact = path_redactor(settings, job_id)
        self._backlog: list[tuple[JobEvent, list[MetricPoint], dict[str, Any] | None]] = []
        self._flush_lock = threading.Lock()
        self._cancel_seen = False
        self.dropped = 0

    def __enter__(self) -> _Attempt:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval):
            try:
                with session_scope(self.sessions) as s:
                    if not JobRepository(s).heartbeat(self.job_id, self.worker, utcnow()):
                        log.warning("job %s: claim lost (another worker took it over)", self.job_id)
                        self.lost.set()
                        return
                self._write(None)  # the database is back: catch up on buffered events
            except Exception as exc:  # a database outage: keep computing, keep beating, catch up later
                if is_unavailable(exc):
                    log.warning("job %s: heartbeat failed, database unavailable (%s)", self.job_id, type(exc).__name__)
                else:
                    log.exception("job %s: heartbeat failed", self.job_id)

    def _write(self, item: tuple[JobEvent, list[MetricPoint], dict[str, Any] | None] | None) -> None:
        """Append ``item`` to the backlog and write the backlog in one transaction (progress: the latest only).
        On an unavailable database the backlog is kept; the claim being lost sets :attr:`lost`."""
        with self._flush_lock:
            if item is not None:
                self._backlog.append(item)
                if len(self._backlog) > MAX_BACKLOG:
                    drop = next((i for i, (e, _, _) in enumerate(self._backlog) if e.kind == "progress"), 0)
                    del self._backlog[drop]
                    self.dropped += 1
            if not self._backlog or self.lost.is_set():
                return
            progress = next((p for _, _, p in reversed(self._backlog) if p is not None), None)
            try:
                with session_scope(self.sessions) as s:
                    repo = JobRepository(s)
                    if progress is not None and not repo.set_progress(self.job_id, self.worker, **progress):
                        self.lost.set()
                        return
                    for row, points, _ in self._backlog:
                        repo.add_event(row, points)
            except Exception as exc:
                if not is_unavailable(exc):
                    raise
                if len(self._backlog) == 1 or len(self._backlog) % 100 == 0:
                    log.warning(
                        "job %s: database unavailable (%s); %d event(s) buffered",
                        self.job_id,
                        type(exc).__name__,
                        len(self._backlog),
                    )
                # the objects were added to a rolled-back session: make them fresh for the next try
                self._backlog = [(_fresh_event(e), [_fresh_point(p) for p in pts], pr) for e, pts, pr in self._backlog]
                return
            self._backlog.clear()

    def on_event(self, event: Any) -> None:
        """Store a pipeline event, its metric points and the job's progress in one transaction."""
        if self.lost.is_set():
            return
        stamp = getattr(event, "time", None)
        when = datetime.fromtimestamp(float(stamp), timezone.utc) if stamp else utcnow()
        metrics = _finite_metrics(getattr(event, "metrics", {}) or {})
        self.stage = event.stage
        row = JobEvent(
            job_id=self.job_id,
            attempt=self.attempt,
            stage=str(event.stage)[:32],
            kind=str(event.kind)[:32],
            step=int(event.step or 0),
            total=int(event.total or 0),
            message=self.redact(str(event.message or "")),
            metrics=metrics,
            data=_redacted(_jsonable(getattr(event, "data", {}) or {}), self.redact),
            time=when,
        )
        points = [
            MetricPoint(job_id=self.job_id, attempt=self.attempt, name=n, step=row.step, value=v, time=when)
            for n, v in metrics.items()
        ]
        step = row.total if event.kind == "stage_end" and row.total else row.step
        progress = {
            "stage": row.stage,
            "step": step,
            "total": row.total,
            "fraction": overall_fraction(row.stage, step, row.total),
        }
        self._write((row, points, progress))

    def should_cancel(self) -> bool:
        """True when the cancel flag is set, this worker lost the job, or the worker is shutting down. While the
        database does not answer, the last flag read stands (the run goes on)."""
        if self.lost.is_set() or (self.stopping is not None and self.stopping()):
            return True
        try:
            with session_scope(self.sessions) as s:
                self._cancel_seen = JobRepository(s).cancel_requested(self.job_id)
        except Exception as exc:
            if not is_unavailable(exc):
                raise
        return self._cancel_seen

    def log(self, message: str, **data: Any) -> None:
        """Write a ``log`` event of the service itself (claim, failure); buffered while the database is down."""
        row = JobEvent(
            job_id=self.job_id,
            attempt=self.attempt,
            stage=self.stage,
            kind="log",
            message=self.redact(message),
            metrics={},
            data=_redacted(_jsonable(data), self.redact),
            time=utcnow(),
        )
        self._write((row, [], None))

    def flush(self) -> None:
        """Write buffered events now, retrying while the database is unavailable (up to the tolerance)."""
        deadline = time.monotonic() + self.settings.db_outage_tolerance
        delay = 0.5
        while True:
            self._write(None)
            if not self._backlog or self.lost.is_set():
                return
            if time.monotonic() + delay > deadline:
                log.error("job %s: %d buffered event(s) could not be written", self.job_id, len(self._backlog))
                return
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def _fresh_event(e: JobEvent) -> JobEvent:
    return JobEvent(
        job_id=e.job_id,
        attempt=e.attempt,
        stage=e.stage,
        kind=e.kind,
        step=e.step,
        total=e.total,
        message=e.message,
        metrics=e.metrics,
        data=e.data,
        time=e.time,
    )


def _fresh_point(p: MetricPoint) -> MetricPoint:
    return MetricPoint(job_id=p.job_id, attempt=p.attempt, name=p.name, step=p.step, value=p.value, time=p.time)


def classify(exc: BaseException, stage: str, settings: Settings) -> dict[str, Any]:
    """The job error for an exception: ``user_error`` for the library's user errors, else ``platform_error``.

    The message of an unexpected exception names only its type and stage (details could leak paths); the
    traceback goes to ``error_detail`` and the worker log, never to clients.
    """
    from lorashear.errors import LoRAShearError

    detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-20000:]
    if isinstance(exc, LoRAShearError):
        return {
            "code": (ErrorCode.USER_ERROR if exc.user_error else ErrorCode.PLATFORM_ERROR).value,
            "type": exc.code or snake_case(type(exc).__name__),
            "message": exc.message,
            "field": exc.field,
            "detail": detail,
        }
    name = type(exc).__name__
    if name in ("SoftTimeLimitExceeded", "TimeLimitExceeded"):
        message = f"the job exceeded its time limit of {settings.job_time_limit} s in stage {stage}"
        kind = "time_limit_exceeded"
    elif isinstance(exc, MemoryError) or "OutOfMemory" in name:
        message = f"out of memory in stage {stage}"
        kind = "out_of_memory"
    else:
        message = f"internal error ({name}) in stage {stage}; the operator's logs have the details"
        kind = "internal_error"
    return {"code": ErrorCode.PLATFORM_ERROR.value, "type": kind, "message": message, "field": None, "detail": detail}


def run_job(job_id: str, *, settings: Settings | None = None, stopping: Callable[[], bool] | None = None) -> Outcome:
    """Run job ``job_id`` to a terminal state (see the module docstring). Safe to call more than once.

    Args:
        job_id: the job's id; the only thing a task message carries.
        settings: service settings (default: from the environment).
        stopping: polled with the cancel flag; when it returns True the pipeline checkpoints and stops, and the
            job goes back to ``queued`` (a graceful shutdown of the embedded worker).

    Returns:
        What happened; ``SKIPPED`` when the job was not claimable.
    """
    settings = settings or get_settings()
    sessions = database(settings).sessions
    worker = worker_identity()
    now = utcnow()
    stale_before = now - timedelta(seconds=settings.stale_after)

    def _claim() -> tuple[dict[str, Any], int] | None:
        with session_scope(sessions) as s:
            repo = JobRepository(s)
            if not repo.claim(job_id, worker, now, stale_before):
                job = repo.get(job_id)
                log.info("job %s: not claimable (%s); nothing to do", job_id, job.status if job else "unknown id")
                return None
            job = repo.get(job_id)
            assert job is not None
            return dict(job.spec), job.attempt

    claimed = with_db_retry(_claim, what="claiming", tolerance=settings.db_outage_tolerance, job_id=job_id)
    if claimed is None:
        return Outcome.SKIPPED
    spec_dict, attempt = claimed

    with _Attempt(settings, job_id, attempt, worker, stopping) as run:
        run.log(f"attempt {attempt} started on {socket.gethostname()}", attempt=attempt, worker=worker)
        log.info("job %s: attempt %d claimed by %s", job_id, attempt, worker)
        try:
            result = _execute(settings, job_id, spec_dict, run)
        except BaseException as exc:
            return _end_with_error(settings, job_id, run, exc)
        if run.lost.is_set():
            return Outcome.LOST
        return _end_with_success(settings, job_id, run, result)


def _execute(settings: Settings, job_id: str, spec_dict: dict[str, Any], run: _Attempt) -> Any:
    from lorashear.config import JobSpec
    from lorashear.pipeline import run as run_pipeline

    spec = JobSpec.from_dict(spec_dict)
    output_dir = settings.artifacts_dir / job_id
    work_dir = settings.work_dir / job_id
    settings.artifacts_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    if output_dir.exists():
        # A previous attempt wrote its output but died before recording it: rebuild from the checkpoints.
        log.warning("job %s: removing unrecorded output of an earlier attempt", job_id)
        shutil.rmtree(output_dir)
    return run_pipeline(
        spec,
        output_dir,
        roots=settings.roots(),
        work_dir=work_dir,
        on_event=run.on_event,
        should_cancel=run.should_cancel,
    )


def _cleanup(settings: Settings, job_id: str) -> None:
    if not settings.keep_work_dirs:
        shutil.rmtree(settings.work_dir / job_id, ignore_errors=True)


def _retrying(run: _Attempt, fn: Callable[[], bool], what: str) -> bool:
    return bool(with_db_retry(fn, what=what, tolerance=run.settings.db_outage_tolerance, job_id=run.job_id))


def _fresh_artifact(a: Artifact) -> Artifact:
    return Artifact(
        id=a.id, job_id=a.job_id, name=a.name, kind=a.kind, path=a.path, size=a.size, sha256=a.sha256, files=a.files
    )


def _end_with_success(settings: Settings, job_id: str, run: _Attempt, result: Any) -> Outcome:
    artifacts = []
    for name, path in sorted(dict(result.artifacts).items()):
        d = describe(Path(path), settings.artifacts_dir)
        artifacts.append(
            Artifact(
                id=new_artifact_id(),
                job_id=job_id,
                name=str(name),
                kind=d.kind,
                path=d.path,
                size=d.size,
                sha256=d.sha256,
                files=d.files,
            )
        )
    summary = _jsonable(dict(result.summary))
    run.flush()

    def _finish() -> bool:
        with session_scope(run.sessions) as s:
            repo = JobRepository(s)
            if not repo.finish(job_id, run.worker, JobStatus.SUCCEEDED, utcnow(), summary=summary):
                return False
            repo.replace_artifacts(job_id, [_fresh_artifact(a) for a in artifacts])
            return True

    if not _retrying(run, _finish, "recording success"):
        log.warning("job %s: finished, but another worker holds it now; result not recorded", job_id)
        return Outcome.LOST
    _cleanup(settings, job_id)
    log.info("job %s: succeeded", job_id)
    return Outcome.SUCCEEDED


def _end_with_error(settings: Settings, job_id: str, run: _Attempt, exc: BaseException) -> Outcome:
    from lorashear.errors import Cancelled

    if run.lost.is_set():
        log.warning("job %s: stopped after losing the claim", job_id)
        return Outcome.LOST
    run.flush()
    if isinstance(exc, Cancelled) and run.stopping is not None and run.stopping():

        def _release() -> bool:
            with session_scope(run.sessions) as s:
                return JobRepository(s).release(job_id, run.worker, utcnow())

        requeued = _retrying(run, _release, "re-queueing")
        if requeued:
            run.log("worker shutting down: checkpoint written, job re-queued")
        log.info("job %s: re-queued at shutdown", job_id)
        return Outcome.REQUEUED if requeued else Outcome.LOST
    if isinstance(exc, Cancelled):

        def _cancelled() -> bool:
            with session_scope(run.sessions) as s:
                return JobRepository(s).finish(job_id, run.worker, JobStatus.CANCELLED, utcnow())

        done = _retrying(run, _cancelled, "recording the cancel")
        _cleanup(settings, job_id)
        log.info("job %s: cancelled", job_id)
        return Outcome.CANCELLED if done else Outcome.LOST
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        raise exc  # the process is going down: leave the claim to go stale so the job is re-queued
    error = classify(exc, run.stage, settings)
    error["message"] = run.redact(error["message"])
    log.error("job %s failed (%s/%s): %s\n%s", job_id, error["code"], error["type"], error["message"], error["detail"])
    try:
        run.log(f"failed: {error['message']}", code=error["code"], type=error["type"], field=error["field"])
        run.flush()
    except Exception:
        log.exception("job %s: could not write the failure event", job_id)

    def _failed() -> bool:
        with session_scope(run.sessions) as s:
            return JobRepository(s).finish(job_id, run.worker, JobStatus.FAILED, utcnow(), error=error)

    done = _retrying(run, _failed, "recording the failure")
    _cleanup(settings, job_id)
    return Outcome.FAILED if done else Outcome.LOST
