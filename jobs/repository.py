"""All SQL of the service. State changes are conditional updates, so concurrent API processes, workers and
reconcilers cannot move a job along two paths at once; each method says which condition guards it.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from jobs.models import Artifact, Job, JobEvent, MetricPoint, utcnow
from jobs.states import JobStatus


def new_job_id() -> str:
    """A fresh job id, ``job_<32 hex>``."""
    return f"job_{uuid.uuid4().hex}"


def new_artifact_id() -> str:
    """A fresh artifact id, ``art_<32 hex>``."""
    return f"art_{uuid.uuid4().hex}"


def _changed(result: Any) -> int:
    """Rows an UPDATE changed (a ``CursorResult``'s ``rowcount``)."""
    return int(result.rowcount)


class BadCursor(ValueError):
    """A pagination cursor that this service did not issue."""


def encode_cursor(created_at: datetime, job_id: str) -> str:
    """Opaque cursor of a job in the newest-first listing."""
    raw = json.dumps([created_at.isoformat(), job_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Inverse of :func:`encode_cursor`.

    Raises:
        BadCursor: not a cursor of ours.
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        return datetime.fromisoformat(created), str(job_id)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise BadCursor(f"invalid cursor {cursor!r}") from exc


class JobRepository:
    """Reads and writes jobs, events, metric points and artifacts through one session (the caller commits)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    # ---- jobs ---------------------------------------------------------------------------------------------------

    def add(self, job: Job) -> Job:
        """Insert a job and flush (so a unique-key clash surfaces here)."""
        self.session.add(job)
        self.session.flush()
        return job

    def get(self, job_id: str, owner: str | None = None) -> Job | None:
        """The job, or ``None``; with ``owner`` only that owner's job."""
        stmt = select(Job).where(Job.id == job_id)
        if owner is not None:
            stmt = stmt.where(Job.owner == owner)
        return self.session.scalars(stmt).one_or_none()

    def refresh(self, job: Job) -> Job:
        """Reload a job's columns from the database."""
        self.session.refresh(job)
        return job

    def get_by_idempotency_key(self, owner: str, key: str) -> Job | None:
        """The job an owner created with this ``Idempotency-Key``."""
        return self.session.scalars(select(Job).where(Job.owner == owner, Job.idempotency_key == key)).one_or_none()

    def list_page(
        self, owner: str, *, status: JobStatus | None = None, after: tuple[datetime, str] | None = None, limit: int = 20
    ) -> tuple[list[Job], bool]:
        """A page of an owner's jobs, newest first, strictly after the cursor position; returns (jobs, has_more)."""
        stmt = select(Job).where(Job.owner == owner)
        if status is not None:
            stmt = stmt.where(Job.status == status.value)
        if after is not None:
            created, job_id = after
            stmt = stmt.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
        stmt = stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
        rows = list(self.session.scalars(stmt))
        return rows[:limit], len(rows) > limit

    def count(self) -> int:
        """Number of jobs of all owners."""
        return int(self.session.scalar(select(func.count()).select_from(Job)) or 0)

    def request_cancel(self, job_id: str) -> bool:
        """Set the cancel flag of a queued or running job; guarded by ``status in (queued, running)``.

        Setting the flag first closes the race with a worker's claim: :meth:`claim` refuses a flagged row, so a job
        is either claimed before this update (the running worker sees the flag within one step) or never.
        """
        res = self.session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]))
            .values(cancel_requested=True)
        )
        return _changed(res) == 1

    def cancel_queued(self, job_id: str, now: datetime) -> bool:
        """``queued -> cancelled``; guarded by ``status = queued``."""
        res = self.session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.QUEUED.value)
            .values(status=JobStatus.CANCELLED.value, cancel_requested=True, finished_at=now)
        )
        return _changed(res) == 1

    def cancel_requested(self, job_id: str) -> bool:
        """The job's cancel flag."""
        return bool(self.session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))

    def claim(self, job_id: str, worker: str, now: datetime, stale_before: datetime) -> bool:
        """``queued -> running`` (or re-claim of a ``running`` job whose heartbeat is older than ``stale_before``),
        incrementing ``attempt``. Exactly one concurrent caller wins."""
        res = self.session.execute(
            update(Job)
            .where(
                Job.id == job_id,
                Job.cancel_requested.is_(False),
                or_(
                    Job.status == JobStatus.QUEUED.value,
                    and_(Job.status == JobStatus.RUNNING.value, Job.heartbeat_at < stale_before),
                ),
            )
            .values(
                status=JobStatus.RUNNING.value,
                attempt=Job.attempt + 1,
                worker=worker,
                heartbeat_at=now,
                started_at=func.coalesce(Job.started_at, now),
            )
        )
        return _changed(res) == 1

    def heartbeat(self, job_id: str, worker: str, now: datetime) -> bool:
        """Refresh the heartbeat; ``False`` when this worker no longer holds the job."""
        res = self.session.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker == worker, Job.status == JobStatus.RUNNING.value)
            .values(heartbeat_at=now)
        )
        return _changed(res) == 1

    def set_progress(self, job_id: str, worker: str, *, stage: str, step: int, total: int, fraction: float) -> bool:
        """Record progress; ``False`` when this worker no longer holds the job."""
        res = self.session.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker == worker, Job.status == JobStatus.RUNNING.value)
            .values(stage=stage, step=step, total=total, fraction=fraction)
        )
        return _changed(res) == 1

    def finish(
        self,
        job_id: str,
        worker: str,
        status: JobStatus,
        now: datetime,
        *,
        summary: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> bool:
        """``running -> succeeded|failed|cancelled``, guarded by this worker still holding the job."""
        values: dict[str, Any] = {"status": status.value, "finished_at": now}
        if status is JobStatus.SUCCEEDED:
            values["fraction"] = 1.0
        if summary is not None:
            values["summary"] = summary
        if error is not None:
            values.update(
                error_code=error.get("code"),
                error_type=error.get("type"),
                error_message=error.get("message"),
                error_field=error.get("field"),
                error_detail=error.get("detail"),
            )
        res = self.session.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker == worker, Job.status == JobStatus.RUNNING.value)
            .values(**values)
        )
        return _changed(res) == 1

    def release(self, job_id: str, worker: str, now: datetime) -> bool:
        """``running -> queued`` by the worker that holds the job (it stopped at a checkpoint to shut down)."""
        res = self.session.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker == worker, Job.status == JobStatus.RUNNING.value)
            .values(status=JobStatus.QUEUED.value, worker=None, enqueued_at=now)
        )
        return _changed(res) == 1

    # ---- reconciliation ------------------------------------------------------------------------------------------

    def stale_running(self, stale_before: datetime) -> Sequence[Job]:
        """Running jobs whose worker stopped heartbeating before ``stale_before``."""
        return self.session.scalars(
            select(Job).where(Job.status == JobStatus.RUNNING.value, Job.heartbeat_at < stale_before)
        ).all()

    def release_stale(
        self, job_id: str, stale_before: datetime, to: JobStatus, now: datetime, error: dict[str, Any] | None = None
    ) -> bool:
        """Move a stale running job to ``queued`` (re-queue), ``cancelled`` or ``failed``; guarded by staleness."""
        values: dict[str, Any] = {"status": to.value, "worker": None}
        if to is JobStatus.QUEUED:
            values["enqueued_at"] = now
        else:
            values["finished_at"] = now
        if error is not None:
            values.update(error_code=error["code"], error_type=error["type"], error_message=error["message"])
        stmt = update(Job).where(
            Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.heartbeat_at < stale_before
        )
        if to is not JobStatus.CANCELLED:  # a cancel that arrived meanwhile wins: the next pass cancels the job
            stmt = stmt.where(Job.cancel_requested.is_(False))
        return _changed(self.session.execute(stmt.values(**values))) == 1

    def queued_cancel_requested(self) -> Sequence[str]:
        """Ids of queued jobs whose cancel flag is set (a cancel recorded while the job was being re-queued)."""
        return self.session.scalars(
            select(Job.id).where(Job.status == JobStatus.QUEUED.value, Job.cancel_requested.is_(True))
        ).all()

    def queued_before(self, before: datetime | None) -> Sequence[str]:
        """Ids of queued jobs last sent to the broker before ``before`` (all queued jobs when ``None``)."""
        stmt = select(Job.id).where(Job.status == JobStatus.QUEUED.value)
        if before is not None:
            stmt = stmt.where(or_(Job.enqueued_at.is_(None), Job.enqueued_at < before))
        return self.session.scalars(stmt.order_by(Job.created_at)).all()

    def mark_enqueued(self, job_ids: Iterable[str], now: datetime) -> None:
        """Record that these jobs were (re-)sent to the broker now."""
        ids = list(job_ids)
        if ids:
            self.session.execute(update(Job).where(Job.id.in_(ids)).values(enqueued_at=now))

    # ---- events and metrics --------------------------------------------------------------------------------------

    def add_event(self, event: JobEvent, metrics: Iterable[MetricPoint] = ()) -> JobEvent:
        """Insert an event and its metric points."""
        self.session.add(event)
        self.session.add_all(list(metrics))
        self.session.flush()
        return event

    def events(self, job_id: str, *, after: int = 0, limit: int = 100) -> tuple[list[JobEvent], bool]:
        """Events with ``id > after``, oldest first; returns (events, has_more)."""
        rows = list(
            self.session.scalars(
                select(JobEvent)
                .where(JobEvent.job_id == job_id, JobEvent.id > after)
                .order_by(JobEvent.id)
                .limit(limit + 1)
            )
        )
        return rows[:limit], len(rows) > limit

    def metric_points(self, job_id: str, names: Sequence[str] = ()) -> Sequence[MetricPoint]:
        """Metric points of a job in insertion order, optionally only the named series."""
        stmt = select(MetricPoint).where(MetricPoint.job_id == job_id)
        if names:
            stmt = stmt.where(MetricPoint.name.in_(list(names)))
        return self.session.scalars(stmt.order_by(MetricPoint.id)).all()

    # ---- artifacts ------------------------------------------------------------------------------------------------

    def replace_artifacts(self, job_id: str, artifacts: Iterable[Artifact]) -> None:
        """Drop a job's artifact rows (from an earlier attempt) and insert these."""
        self.session.execute(delete(Artifact).where(Artifact.job_id == job_id))
        self.session.add_all(list(artifacts))
        self.session.flush()

    def artifacts(self, job_id: str) -> Sequence[Artifact]:
        """A job's artifacts by name."""
        return self.session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)).all()

    def artifact(self, job_id: str, artifact_id: str) -> Artifact | None:
        """One artifact of a job."""
        return self.session.scalars(
            select(Artifact).where(Artifact.job_id == job_id, Artifact.id == artifact_id)
        ).one_or_none()


__all__ = ["BadCursor", "JobRepository", "decode_cursor", "encode_cursor", "new_artifact_id", "new_job_id", "utcnow"]
