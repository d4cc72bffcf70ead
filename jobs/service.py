"""The service layer the routes call: validation before queueing, idempotent creation, reads, cancel, downloads.

Services never commit; the caller commits and only then wakes a worker (enqueue after commit).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from jobs.artifacts import resolve_inside
from jobs.errors import Conflict, InvalidSpec, NotFound, ServiceError, snake_case
from jobs.models import Artifact, Job, JobEvent, utcnow
from jobs.repository import BadCursor, JobRepository, decode_cursor, encode_cursor, new_job_id
from jobs.schemas import (
    ArtifactOut,
    EventList,
    EventOut,
    JobError,
    JobList,
    JobOut,
    MetricPointOut,
    Progress,
)
from jobs.settings import Settings
from jobs.states import JobStatus

MAX_PAGE = 100


MAX_MESSAGE = 1000
"""Longest validation message or warning stored or returned (a message may quote a huge value)."""


def _clip(text: str, limit: int = MAX_MESSAGE) -> str:
    return text if len(text) <= limit else text[: limit - 15] + "... (truncated)"


def validate_spec(
    body: dict[str, Any], settings: Settings, *, allow_unknown_fields: bool = False
) -> tuple[dict[str, Any], list[str]]:
    """Validate a spec with the library (``JobSpec.from_dict``) and the cheap pre-flight. Touches no database:
    callers run it before taking a connection.

    Args:
        body: the request body.
        settings: roots and limits.
        allow_unknown_fields: accept unknown keys with a warning instead of refusing them (``config_error``
            naming them).

    Returns:
        The canonical spec (every default filled in) and the warnings (unknown keys when allowed).

    Raises:
        InvalidSpec: ``code`` is the library error's type (``config_error``, ``data_error``,
            ``unsupported_model_error``, ``adapter_mismatch_error``, ``target_not_expressible_error``), ``field``
            its dotted field.
    """
    from lorashear.config import JobSpec
    from lorashear.errors import LoRAShearError
    from lorashear.preflight import preflight

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            spec = JobSpec.from_dict(body, unknown_fields="warn" if allow_unknown_fields else "error")
        preflight(spec, settings.roots(), memory_limit=settings.worker_memory_bytes or None)
    except LoRAShearError as exc:
        field = exc.field[:200] if exc.field else exc.field
        raise InvalidSpec(_clip(exc.message), field=field, code=snake_case(type(exc).__name__)) from None
    return spec.to_dict(), [_clip(str(w.message)) for w in caught if issubclass(w.category, UserWarning)][:50]


def request_hash(body: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a request body (detects a reused ``Idempotency-Key``)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Download:
    """What a download route streams: one file, or a directory as tar entries ``(arcname, path, size)``."""

    filename: str
    path: Path | None = None
    size: int = 0
    tar_entries: list[tuple[str, Path, int]] | None = None


class JobService:
    """Use cases of the jobs API for one owner (an API key name, or ``local`` without keys)."""

    def __init__(self, session: Session, settings: Settings, owner: str) -> None:
        self.session = session
        self.settings = settings
        self.owner = owner
        self.repo = JobRepository(session)

    # ---- create ---------------------------------------------------------------------------------------------------

    def create(
        self, body: dict[str, Any], idempotency_key: str | None = None, *, allow_unknown_fields: bool = False
    ) -> tuple[Job, bool]:
        """Validate and insert a queued job; returns ``(job, created)``.

        With an ``Idempotency-Key`` already used by this owner, the earlier job is returned (``created`` False) if
        the body is the same. No database connection is held while the spec is validated (the slow part), so a
        burst of submissions cannot exhaust the connection pool.

        Raises:
            InvalidSpec: the spec is invalid (nothing is inserted).
            Conflict: the key was used with a different body.
        """
        digest = request_hash(body)
        if idempotency_key is not None:
            if not 1 <= len(idempotency_key) <= 255:
                raise InvalidSpec("Idempotency-Key must be 1-255 characters", field="Idempotency-Key")
            existing = self.repo.get_by_idempotency_key(self.owner, idempotency_key)
            if existing is not None:
                return self._replay(existing, digest), False
            self.session.rollback()  # end the read transaction: its connection goes back to the pool
        spec, spec_warnings = validate_spec(body, self.settings, allow_unknown_fields=allow_unknown_fields)
        now = utcnow()
        job = Job(
            id=new_job_id(),
            owner=self.owner,
            status=JobStatus.QUEUED.value,
            spec=spec,
            model=spec["model"],
            warnings=spec_warnings,
            idempotency_key=idempotency_key,
            request_hash=digest,
            stage=None,
            step=0,
            total=0,
            fraction=0.0,
            attempt=0,
            cancel_requested=False,
            created_at=now,
            enqueued_at=now,
        )
        try:
            with self.session.begin_nested():
                self.repo.add(job)
        except IntegrityError:
            if idempotency_key is None:
                raise
            existing = self.repo.get_by_idempotency_key(self.owner, idempotency_key)  # a concurrent twin won
            if existing is None:
                raise
            return self._replay(existing, digest), False
        return job, True

    def _replay(self, existing: Job, digest: str) -> Job:
        if existing.request_hash != digest:
            raise Conflict(
                "this Idempotency-Key was already used with a different request body",
                field="Idempotency-Key",
                code="idempotency_key_reused",
            )
        return existing

    # ---- read -----------------------------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        """The owner's job.

        Raises:
            NotFound: no such job for this owner.
        """
        job = self.repo.get(job_id, self.owner)
        if job is None:
            raise NotFound(f"no job {job_id!r}", field="job_id")
        return job

    def list_jobs(self, *, status: JobStatus | None, after: str | None, limit: int) -> JobList:
        """A page of jobs, newest first.

        Raises:
            ServiceError: invalid cursor or limit (422).
        """
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidSpec(f"limit must be between 1 and {MAX_PAGE}", field="limit", code="invalid_request")
        try:
            position = decode_cursor(after) if after else None
        except BadCursor:
            raise InvalidSpec("invalid cursor", field="after", code="invalid_request") from None
        jobs, more = self.repo.list_page(self.owner, status=status, after=position, limit=limit)
        cursor = encode_cursor(jobs[-1].created_at, jobs[-1].id) if more and jobs else None
        return JobList(data=[job_out(j) for j in jobs], has_more=more, next_cursor=cursor)

    def cancel(self, job_id: str) -> Job:
        """Cancel a job: a queued one at once, a running one within one pipeline step (idempotent).

        Raises:
            NotFound: no such job.
            Conflict: the job already succeeded or failed.
        """
        job = self.get(job_id)
        # Flag first (atomic, guarded by queued/running), then move a still-queued job to cancelled. A worker's
        # claim refuses a flagged row, so whatever the interleaving the cancel is recorded before we answer 200.
        flagged = self.repo.request_cancel(job_id)
        if flagged and self.repo.cancel_queued(job_id, utcnow()):
            self.repo.add_event(
                JobEvent(
                    job_id=job_id,
                    attempt=job.attempt,
                    stage=job.stage or "load",
                    kind="log",
                    message="cancelled before it started",
                    metrics={},
                    data={},
                    time=utcnow(),
                )
            )
        self.repo.refresh(job)
        if job.status in (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value):
            raise Conflict(f"job {job_id} already {job.status}; it cannot be cancelled", code="job_finished")
        return job

    def events(self, job_id: str, *, after: int, limit: int) -> EventList:
        """A page of a job's events, oldest first, after event id ``after``."""
        self.get(job_id)
        if not 1 <= limit <= 1000:
            raise InvalidSpec("limit must be between 1 and 1000", field="limit", code="invalid_request")
        rows, more = self.repo.events(job_id, after=after, limit=limit)
        return EventList(
            data=[event_out(e) for e in rows], has_more=more, next_cursor=str(rows[-1].id) if rows else None
        )

    def metrics(self, job_id: str, names: Sequence[str] = ()) -> dict[str, list[MetricPointOut]]:
        """Named metric series ``{name: [{step, value, time}]}`` in the order they were recorded."""
        self.get(job_id)
        series: dict[str, list[MetricPointOut]] = {}
        for p in self.repo.metric_points(job_id, names):
            series.setdefault(p.name, []).append(MetricPointOut(step=p.step, value=p.value, time=p.time))
        return series

    def artifacts(self, job_id: str) -> list[ArtifactOut]:
        """The artifacts of a job (empty until it succeeds)."""
        self.get(job_id)
        return [artifact_out(a) for a in self.repo.artifacts(job_id)]

    def download(self, job_id: str, artifact_id: str, member: str | None = None) -> Download:
        """What to stream for an artifact: the file, one ``member`` file of a directory, or the directory as tar.

        Raises:
            NotFound: unknown job, artifact, or member (only manifest entries are served).
            ServiceError: the file vanished from disk (410).
        """
        self.get(job_id)
        art = self.repo.artifact(job_id, artifact_id)
        if art is None:
            raise NotFound(f"no artifact {artifact_id!r} in job {job_id}", field="artifact_id")
        root = self.settings.artifacts_dir
        try:
            base = resolve_inside(root, art.path)
        except PermissionError:
            raise NotFound(f"no artifact {artifact_id!r} in job {job_id}", field="artifact_id") from None
        if art.kind == "file":
            if member is not None:
                raise NotFound("a file artifact has no members", field="path")
            return Download(filename=base.name, path=_existing(base), size=art.size)
        files = {f["path"]: f for f in art.files or []}
        if member is not None:
            entry = files.get(member)
            if entry is None:
                raise NotFound(f"{member!r} is not a file of artifact {art.name}", field="path")
            return Download(filename=Path(member).name, path=_member(base, entry["path"]), size=entry["size"])
        entries = [(f"{art.name}/{p}", _member(base, p), f["size"]) for p, f in sorted(files.items())]
        return Download(filename=f"{job_id}-{art.name}.tar", tar_entries=entries)


class Gone(ServiceError):
    """A recorded artifact file is missing from disk (410)."""

    status_code = 410
    code = "artifact_gone"


def _member(base: Path, relative: str) -> Path:
    """A manifest entry resolved inside its directory artifact (a symlink placed there later cannot escape)."""
    try:
        return _existing(resolve_inside(base, relative))
    except PermissionError:
        raise Gone("the artifact's file is no longer what was recorded") from None


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise Gone("the artifact's file is no longer on disk")
    return path


def job_out(job: Job) -> JobOut:
    """The API view of a job row."""
    error = None
    if job.error_code:
        error = JobError(
            code=job.error_code, type=job.error_type, message=job.error_message or "", field=job.error_field
        )
    return JobOut(
        id=job.id,
        status=JobStatus(job.status),
        stage=job.stage,
        progress=Progress(step=job.step, total=job.total, fraction=round(job.fraction, 6)),
        spec=job.spec,
        warnings=list(job.warnings or []),
        attempt=job.attempt,
        cancel_requested=job.cancel_requested,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        error=error,
        summary=job.summary,
        artifacts=[artifact_out(a) for a in job.artifacts],
    )


def artifact_out(art: Artifact) -> ArtifactOut:
    """The API view of an artifact row."""
    return ArtifactOut(
        id=art.id,
        job_id=art.job_id,
        name=art.name,
        kind=art.kind,  # type: ignore[arg-type]
        size=art.size,
        sha256=art.sha256,
        files=art.files,
        created_at=art.created_at,
        download_url=f"/v1/jobs/{art.job_id}/artifacts/{art.id}/content",
    )


def event_out(e: JobEvent) -> EventOut:
    """The API view of an event row."""
    return EventOut(
        id=e.id,
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
