"""The service's own logic on a migrated SQLite database: states, settings policy, claiming, the reconciler,
cursors and tar streaming; and the task body mapping a real pipeline failure to a user error."""

from __future__ import annotations

import io
import tarfile
from datetime import timedelta
from pathlib import Path

import pytest

from jobs.artifacts import iter_tar, resolve_inside, tar_size
from jobs.context import database
from jobs.db import migrate, session_scope
from jobs.models import Job, JobEvent, utcnow
from jobs.reconcile import reconcile
from jobs.repository import BadCursor, JobRepository, decode_cursor, encode_cursor
from jobs.runner import Outcome, run_job
from jobs.service import JobService
from jobs.settings import Settings, SettingsError, hash_key
from jobs.states import JobStatus, can_transition

SPEC = {"model": "stories260K", "target_ratio": 0.2, "lhspg": {"warmup_steps": 1, "periods": 1, "period_steps": 1}}


class RecordingDispatcher:
    """Stands in for the broker only: records what the reconciler sends."""

    def __init__(self, pending: set[str] | None = None) -> None:
        self.sent: list[str] = []
        self._pending = pending if pending is not None else set()

    def send(self, job_id: str) -> None:
        self.sent.append(job_id)

    def pending(self) -> set[str] | None:
        return self._pending

    def ping(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = Settings(var_dir=tmp_path / "var", stale_after=5, requeue_queued_after=10, max_attempts=3)
    migrate(s.db_url)
    return s


def _new_job(settings: Settings, spec: dict | None = None, **columns) -> str:
    with session_scope(database(settings).sessions) as s:
        job, created = JobService(s, settings, "local").create(dict(spec or SPEC))
        assert created
        for key, value in columns.items():
            setattr(job, key, value)
        return job.id


def _job(settings: Settings, job_id: str) -> Job:
    with session_scope(database(settings).sessions) as s:
        job = JobRepository(s).get(job_id)
        assert job is not None
        return job


def test_transitions() -> None:
    assert can_transition("queued", "running") and can_transition("running", "queued")
    assert can_transition("running", "cancelled") and not can_transition("succeeded", "running")
    assert not can_transition("cancelled", "queued") and not can_transition("failed", "succeeded")
    assert all(JobStatus(s).terminal for s in ("succeeded", "failed", "cancelled"))


def test_settings_key_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    Settings().check_secure()  # embedded on loopback: keys optional
    with pytest.raises(SettingsError, match="API_KEY_HASHES"):
        Settings(broker_url="redis://x:6379/0").check_secure()
    with pytest.raises(SettingsError, match="not a loopback"):
        Settings(bind_host="0.0.0.0").check_secure()
    Settings(bind_host="0.0.0.0", allow_anonymous=True).check_secure()
    with pytest.raises(ValueError, match="placeholder"):
        Settings(api_key_hashes=[f"ops:{hash_key('changeme')}"])
    with pytest.raises(ValueError, match="64 hex"):
        Settings(api_key_hashes=["ops:plaintext-key"])
    monkeypatch.setenv("API_KEY_HASHES", f"alice:{hash_key('s3cret-a')},{hash_key('s3cret-b')}")
    s = Settings(broker_url="redis://x:6379/0")
    s.check_secure()
    assert s.authenticate("s3cret-a") == "alice"
    assert s.authenticate("s3cret-b") == hash_key("s3cret-b")[:8]
    assert s.authenticate("wrong") is None


def test_claim_is_exclusive_and_idempotent(settings: Settings) -> None:
    job_id = _new_job(settings)
    sessions = database(settings).sessions
    now = utcnow()
    with session_scope(sessions) as s:
        assert JobRepository(s).claim(job_id, "w1", now, now - timedelta(seconds=5))
    with session_scope(sessions) as s:  # alive: nobody else may claim it
        assert not JobRepository(s).claim(job_id, "w2", now, now - timedelta(seconds=5))
    assert run_job(job_id, settings=settings) is Outcome.SKIPPED  # a duplicate delivery does nothing
    later = now + timedelta(seconds=10)
    with session_scope(sessions) as s:  # stale: re-claimable, attempt 2
        assert JobRepository(s).claim(job_id, "w2", later, later - timedelta(seconds=5))
    job = _job(settings, job_id)
    assert (job.status, job.attempt, job.worker) == ("running", 2, "w2")
    with session_scope(sessions) as s:  # w1 lost it: its heartbeat and result are refused
        assert not JobRepository(s).heartbeat(job_id, "w1", later)
        assert not JobRepository(s).finish(job_id, "w1", JobStatus.SUCCEEDED, later)
        assert JobRepository(s).finish(job_id, "w2", JobStatus.SUCCEEDED, later)
    assert run_job(job_id, settings=settings) is Outcome.SKIPPED
    assert run_job("job_unknown", settings=settings) is Outcome.SKIPPED


def test_reconciler(settings: Settings) -> None:
    old = utcnow() - timedelta(seconds=60)
    stale = _new_job(settings, status="running", attempt=1, worker="dead", heartbeat_at=old)
    cancelling = _new_job(settings, status="running", attempt=1, worker="dead", heartbeat_at=old, cancel_requested=True)
    exhausted = _new_job(settings, status="running", attempt=3, worker="dead", heartbeat_at=old)
    alive = _new_job(settings, status="running", attempt=1, worker="w", heartbeat_at=utcnow())
    lost = _new_job(settings, enqueued_at=old)
    waiting = _new_job(settings, enqueued_at=old)
    fresh = _new_job(settings)
    dispatcher = RecordingDispatcher(pending={waiting})

    report = reconcile(settings, dispatcher)  # type: ignore[arg-type]
    assert report.requeued == [stale] and report.cancelled == [cancelling] and report.failed == [exhausted]
    assert report.resent == [lost]
    assert sorted(dispatcher.sent) == sorted([stale, lost])
    assert _job(settings, stale).status == "queued" and _job(settings, stale).worker is None
    assert _job(settings, cancelling).status == "cancelled"
    failed = _job(settings, exhausted)
    assert (failed.status, failed.error_code, failed.error_type) == ("failed", "platform_error", "worker_lost")
    assert _job(settings, alive).status == "running" and _job(settings, fresh).status == "queued"
    with session_scope(database(settings).sessions) as s:
        events, _ = JobRepository(s).events(stale)
        assert any("re-queued for attempt 2" in e.message for e in events)
    again = RecordingDispatcher(pending={waiting})
    reconcile(settings, again)  # type: ignore[arg-type]
    assert again.sent == []  # nothing is due again so soon
    startup = RecordingDispatcher(pending=set())
    reconcile(settings, startup, resend_all_queued=True)  # type: ignore[arg-type]
    assert set(startup.sent) == {stale, lost, waiting, fresh}


def test_cursor_roundtrip() -> None:
    now = utcnow()
    assert decode_cursor(encode_cursor(now, "job_1")) == (now, "job_1")
    for bad in ("", "not-a-cursor", "W10", "e30"):
        with pytest.raises(BadCursor):
            decode_cursor(bad)


def test_tar_stream_and_path_guard(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.json").write_text("{}")
    (tmp_path / "m" / "w.bin").write_bytes(bytes(range(256)) * 9)
    files = [(f"model/{p.name}", p, p.stat().st_size) for p in sorted((tmp_path / "m").iterdir())]
    data = b"".join(iter_tar(files))
    assert len(data) == tar_size(files)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.extractfile("model/w.bin").read() == bytes(range(256)) * 9
    assert resolve_inside(tmp_path, "m/a.json") == (tmp_path / "m" / "a.json").resolve()
    for bad in ("../x", "/etc/passwd", "m/../../x"):
        with pytest.raises(PermissionError):
            resolve_inside(tmp_path / "m", bad)


@pytest.mark.slow
def test_pipeline_user_error_becomes_a_failed_job(settings: Settings, tmp_path: Path) -> None:
    """The worker's data root lacks the files the API saw: the real pipeline raises a user error naming the field;
    the job fails with ``user_error``, the error type, message and field, and keeps no checkpoints."""
    job_id = _new_job(settings)
    empty = tmp_path / "empty-data"
    empty.mkdir()
    worker_settings = settings.model_copy(update={"data_root": empty})
    assert run_job(job_id, settings=worker_settings) is Outcome.FAILED
    job = _job(settings, job_id)
    assert job.status == "failed" and job.error_code == "user_error"
    assert job.error_type in ("data_error", "config_error") and job.error_field and job.error_field.startswith("data")
    assert "Traceback" in (job.error_detail or "") and "Traceback" not in (job.error_message or "")
    assert not (settings.work_dir / job_id).exists()
    with session_scope(database(settings).sessions) as s:
        events: list[JobEvent] = JobRepository(s).events(job_id)[0]
    assert any(e.message.startswith("failed:") for e in events)


def test_diverged_training_fails_the_job_as_a_user_error_naming_the_learning_rate(settings: Settings) -> None:
    """Issue 7, item 6: lr 1e6 once shipped a uniform-output model as ``succeeded``; now ``user_error/diverged``."""
    spec = {
        "model": "stories260K",
        "target_ratio": 0.2,
        "lhspg": {"lr": 1e6, "warmup_steps": 0, "periods": 1, "period_steps": 1, "batch_size": 2, "seq_len": 32},
        "recovery": {"enabled": False},
        "evaluation": {"zeroshot": {"enabled": False}, "speed": {"enabled": False}},
    }
    job_id = _new_job(settings, spec)
    assert run_job(job_id, settings=settings) is Outcome.FAILED
    job = _job(settings, job_id)
    assert (job.error_code, job.error_type, job.error_field) == ("user_error", "diverged", "lhspg.lr")
    assert "lower lhspg.lr" in (job.error_message or "")
    assert not (settings.artifacts_dir / job_id).exists(), "nothing shipped"


@pytest.mark.slow
def test_embedded_shutdown_requeues_and_resumes(settings: Settings) -> None:
    """A worker stopping mid-job checkpoints, puts the job back in the queue, and the next run resumes it."""
    import threading
    import time

    with session_scope(database(settings).sessions) as s:
        body = {
            "model": "stories260K",
            "target_ratio": 0.2,
            "lhspg": {"warmup_steps": 2, "periods": 2, "period_steps": 12, "batch_size": 4, "seq_len": 64},
            "recovery": {"rounds": 1, "steps_per_round": 3, "batch_size": 4, "seq_len": 64},
            "analysis": {"max_tokens": 2048},
            "evaluation": {"max_windows": 8},
            "runtime": {"checkpoint_every": 5},
        }
        job_id = JobService(s, settings, "local").create(body)[0].id
    stop = threading.Event()
    outcome: list[Outcome] = []
    t = threading.Thread(target=lambda: outcome.append(run_job(job_id, settings=settings, stopping=stop.is_set)))
    t.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = _job(settings, job_id)
        if job.stage == "prune" and job.step >= 7:
            break
        time.sleep(0.2)
    stop.set()
    t.join(timeout=300)
    assert outcome == [Outcome.REQUEUED]
    job = _job(settings, job_id)
    assert (job.status, job.attempt, job.worker) == ("queued", 1, None)
    assert run_job(job_id, settings=settings) is Outcome.SUCCEEDED
    job = _job(settings, job_id)
    assert (job.status, job.attempt) == ("succeeded", 2)
    with session_scope(database(settings).sessions) as s:
        events = JobRepository(s).events(job_id, limit=1000)[0]
    assert any("re-queued" in e.message for e in events if e.attempt == 1)
    assert any("resumed" in e.message for e in events if e.attempt == 2)
    steps = [e.step for e in events if e.attempt == 2 and e.stage == "prune" and e.kind == "progress"]
    assert steps and min(steps) > 1


def test_reconciler_names_the_lost_worker_and_waits_after_a_database_outage(settings: Settings) -> None:
    """Issue 7 items 3 and 11: the event names the worker (not ``None``); right after an outage the reconciler
    judges no heartbeat stale, so a live worker that could not heartbeat keeps its attempt."""
    from jobs.reconcile import OutageGuard

    job_id = _new_job(settings)
    sessions = database(settings).sessions
    with session_scope(sessions) as s:
        now = utcnow()
        assert JobRepository(s).claim(job_id, "host:1:abc", now, now)
        s.get(Job, job_id).heartbeat_at = now - timedelta(seconds=60)  # type: ignore[union-attr]
    clock = [1000.0]
    guard = OutageGuard(settings.stale_after, clock=lambda: clock[0])
    guard.failed()  # the database was just unreachable
    report = guard.run(settings, RecordingDispatcher())
    assert report is not None and report.requeued == []
    clock[0] += settings.stale_after
    report = guard.run(settings, RecordingDispatcher())
    assert report is not None and report.requeued == [job_id]
    with session_scope(sessions) as s:
        messages = [e.message for e in s.query(JobEvent).filter_by(job_id=job_id)]
    assert any(m.startswith("worker host:1:abc lost") for m in messages), messages
