"""Server-Sent Events of a job's progress: polls the database and streams new events until the job ends."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi import Request
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from jobs.repository import JobRepository
from jobs.service import event_out
from jobs.settings import Settings
from jobs.states import JobStatus

KEEPALIVE_SECONDS = 15.0


def _poll(sessions: sessionmaker[Session], owner: str, job_id: str, after: int) -> tuple[list[str], int, str | None]:
    """Frames of events after ``after``, the last id, and the job status (``None`` if it vanished)."""
    with sessions() as s:
        repo = JobRepository(s)
        job = repo.get(job_id, owner)
        if job is None:
            return [], after, None
        frames = []
        while True:
            rows, more = repo.events(job_id, after=after, limit=500)
            for e in rows:
                frames.append(f"id: {e.id}\nevent: {e.kind}\ndata: {event_out(e).model_dump_json()}\n\n")
                after = e.id
            if not more:
                break
        return frames, after, job.status


async def event_stream(
    request: Request, sessions: sessionmaker[Session], settings: Settings, owner: str, job_id: str, after: int
) -> AsyncIterator[str]:
    """Yield SSE frames (``id``, ``event`` = event kind, ``data`` = the event JSON) for new events; comments keep
    idle connections alive; when the job is terminal and drained, a final ``event: end`` carries its status."""
    last_sent = time.monotonic()
    yield "retry: 2000\n\n"
    while True:
        frames, after, status = await run_in_threadpool(_poll, sessions, owner, job_id, after)
        for frame in frames:
            yield frame
            last_sent = time.monotonic()
        if status is None or JobStatus(status).terminal:
            yield f"event: end\ndata: {json.dumps({'job_id': job_id, 'status': status})}\n\n"
            return
        if await request.is_disconnected():
            return
        if time.monotonic() - last_sent > KEEPALIVE_SECONDS:
            yield ": keepalive\n\n"
            last_sent = time.monotonic()
        await asyncio.sleep(settings.sse_poll_interval)
