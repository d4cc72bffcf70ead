"""Routes of ``/v1/jobs`` and the health probes: thin wrappers around :class:`jobs.service.JobService`."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from api.deps import DispatcherDep, OwnerDep, ServiceDep, SessionDep, SettingsDep
from api.metrics import render
from api.sse import event_stream
from jobs.artifacts import iter_file, iter_tar, tar_size
from jobs.db import ping
from jobs.errors import InvalidSpec
from jobs.schemas import (
    ArtifactList,
    CatalogEntry,
    CatalogList,
    ErrorResponse,
    EventList,
    Health,
    JobList,
    JobOut,
    JobSpecIn,
    MetricPointOut,
)
from jobs.service import job_out
from jobs.states import JobStatus

log = logging.getLogger("api")

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or unknown API key"},
    404: {"model": ErrorResponse, "description": "No such job or artifact"},
    422: {"model": ErrorResponse, "description": "Invalid request; `field` names the culprit"},
    503: {"model": ErrorResponse, "description": "The database is unavailable or saturated; see Retry-After"},
}

router = APIRouter(prefix="/v1", tags=["jobs"], responses=ERRORS)
health = APIRouter(tags=["health"])


@router.post(
    "/jobs",
    response_model=JobOut,
    status_code=201,
    responses={
        200: {"model": JobOut, "description": "Replay of an earlier request with the same Idempotency-Key"},
        409: {"model": ErrorResponse, "description": "Idempotency-Key reused with a different body"},
        413: {"model": ErrorResponse, "description": "Request body over MAX_BODY_BYTES"},
        415: {"model": ErrorResponse, "description": "The body is not JSON (Content-Type)"},
        429: {"model": ErrorResponse, "description": "Too many submissions in progress; see Retry-After"},
    },
)
async def create_job(
    spec: JobSpecIn,
    request: Request,
    response: Response,
    service: ServiceDep,
    session: SessionDep,
    dispatcher: DispatcherDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=255,
            description="Makes retries safe: the same key and body return the same job (1-255 characters).",
        ),
    ] = None,
    allow_unknown_fields: Annotated[
        bool, Query(description="Accept unknown spec fields with a warning instead of refusing them (422)")
    ] = False,
) -> JobOut:
    """Submit a pruning job. The spec is validated (schema, library config, pre-flight) before anything is
    queued; the job is committed as ``queued`` and only then sent to a worker, by task name, with its id.
    Unknown spec fields are refused (``config_error`` naming them) unless ``allow_unknown_fields=true``."""
    body = await request.json()
    if not isinstance(body, dict):  # pragma: no cover - the schema already requires an object
        raise InvalidSpec("the request body must be a JSON object", field="body")

    def _create() -> tuple[JobOut, bool, str]:
        job, created = service.create(body, idempotency_key, allow_unknown_fields=allow_unknown_fields)
        out = job_out(job)  # inside the transaction: nothing is lazily loaded after it
        session.commit()
        session.close()  # release the connection (and SQLite's write lock) before the broker call and the response
        return out, created, job.id

    async with request.app.state.admission.slot():
        out, created, job_id = await run_in_threadpool(_create)
    if created:
        try:
            await run_in_threadpool(dispatcher.send, job_id)
        except Exception:  # the job stays queued; the reconciler re-sends it
            log.exception("could not send job %s to the broker; the reconciler will retry", job_id)
    response.status_code = 201 if created else 200
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    return out


@router.get("/jobs", response_model=JobList)
def list_jobs(
    service: ServiceDep,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this state")] = None,
    after: Annotated[str | None, Query(description="Cursor: `next_cursor` of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobList:
    """List your jobs, newest first, with cursor pagination."""
    return service.list_jobs(status=status, after=after, limit=limit)


@router.get("/jobs/{job_id}", response_model=JobOut)
def get_job(job_id: str, service: ServiceDep) -> JobOut:
    """One job: state, stage, progress, spec, times, error, summary metrics and artifacts."""
    return job_out(service.get(job_id))


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, responses={409: {"model": ErrorResponse}})
def cancel_job(job_id: str, service: ServiceDep, session: SessionDep) -> JobOut:
    """Cancel a job: a queued job at once; a running one stops within one pipeline step (``cancel_requested``
    shows it is on its way). Cancelling a cancelled job is a no-op; a finished one answers 409."""
    job = service.cancel(job_id)
    out = job_out(job)
    session.commit()
    session.close()
    return out


@router.get(
    "/jobs/{job_id}/events",
    response_model=EventList,
    responses={200: {"content": {"text/event-stream": {}}, "description": "A page of events, or an SSE stream"}},
)
async def list_events(
    job_id: str,
    request: Request,
    service: ServiceDep,
    session: SessionDep,
    settings: SettingsDep,
    after: Annotated[int, Query(ge=0, le=2**63 - 1, description="Return events with id > after")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    stream: Annotated[bool, Query(description="Server-Sent Events (same as Accept: text/event-stream)")] = False,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
):
    """A job's progress events, oldest first; with ``Accept: text/event-stream`` or ``stream=true`` a Server-Sent
    Events stream that follows the job until it ends (``event: end``). ``Last-Event-ID`` resumes a stream."""
    wants_sse = stream or "text/event-stream" in request.headers.get("accept", "")
    if not wants_sse:
        return await run_in_threadpool(service.events, job_id, after=after, limit=limit)
    await run_in_threadpool(service.get, job_id)  # 404 before the stream starts
    await run_in_threadpool(session.close)  # hold no transaction while streaming (SQLite: no lock)
    start = after
    if last_event_id and last_event_id.isdigit() and len(last_event_id) < 19:  # ids are 64-bit
        start = max(start, int(last_event_id))
    return StreamingResponse(
        event_stream(request, request.app.state.sessions, settings, service.owner, job_id, start),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/jobs/{job_id}/metrics", response_model=dict[str, list[MetricPointOut]])
def get_metrics(
    job_id: str,
    service: ServiceDep,
    name: Annotated[list[str] | None, Query(description="Only these series (repeatable)")] = None,
) -> dict[str, list[MetricPointOut]]:
    """Metric series of a job, ``{name: [{step, value, time}]}`` (e.g. ``lhspg/loss``, ``recovery/loss``)."""
    return service.metrics(job_id, name or ())


@router.get("/jobs/{job_id}/artifacts", response_model=ArtifactList)
def list_artifacts(job_id: str, service: ServiceDep) -> ArtifactList:
    """Artifacts of a finished job: ``model`` (directory), ``plan`` and ``report`` (JSON files), ``plots``
    (``report.png``: sensitivity map, kept widths, loss and mix-weight curves), optionally ``adapter`` and
    ``pruned_base`` (directories)."""
    return ArtifactList(data=service.artifacts(job_id))


@router.get(
    "/jobs/{job_id}/artifacts/{artifact_id}/content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}, "application/x-tar": {}}}},
)
def download_artifact(
    job_id: str,
    artifact_id: str,
    service: ServiceDep,
    session: SessionDep,
    path: Annotated[str | None, Query(description="One file of a directory artifact (a manifest path)")] = None,
) -> StreamingResponse:
    """Download an artifact: a file as is; a directory as an uncompressed tar (entries under ``<name>/``), or
    one of its files with ``?path=`` (only paths listed in the artifact's manifest are served)."""
    d = service.download(job_id, artifact_id, path)
    session.close()  # hold no transaction while streaming (SQLite: no lock)
    if d.tar_entries is not None:
        return StreamingResponse(
            iter_tar(d.tar_entries),
            media_type="application/x-tar",
            headers={
                "Content-Disposition": f'attachment; filename="{d.filename}"',
                "Content-Length": str(tar_size(d.tar_entries)),
            },
        )
    assert d.path is not None
    return StreamingResponse(
        iter_file(d.path),
        media_type="application/json" if d.filename.endswith(".json") else "application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{d.filename}"', "Content-Length": str(d.size)},
    )


catalog = APIRouter(prefix="/v1", tags=["catalog"], responses={401: ERRORS[401], 503: ERRORS[503]})


@catalog.get("/models", response_model=CatalogList)
def list_models(settings: SettingsDep, _owner: OwnerDep) -> CatalogList:
    """What a spec's ``model`` (and ``adapter``) may name: model directories (``config.json``), ``.gguf`` files and
    PEFT adapter directories under the configured model root, by name (never a server path)."""
    entries = settings.roots().list_models()
    return CatalogList(data=[CatalogEntry(**dataclasses.asdict(e)) for e in entries])


@catalog.get("/data", response_model=CatalogList)
def list_data(settings: SettingsDep, _owner: OwnerDep) -> CatalogList:
    """What a spec's ``data`` section (``train``, ``eval``, ``calibration``, ``instruct``, ...) may name: the data
    files under the configured data root, by name."""
    entries = settings.roots().list_data()
    return CatalogList(data=[CatalogEntry(**dataclasses.asdict(e)) for e in entries])


@health.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
def prometheus_metrics(request: Request) -> Response:
    """Prometheus metrics: jobs by status, queue wait and run time histograms, worker heartbeat ages, request
    latency by route (``api.metrics``). Aggregates only: no job ids, owners or specs."""
    return Response(render(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)


@health.get("/healthz", response_model=Health)
def healthz() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


@health.get("/readyz", response_model=Health, responses={503: {"model": Health}})
def readyz(request: Request, session: SessionDep, dispatcher: DispatcherDep, settings: SettingsDep):
    """Readiness: the database answers ``SELECT 1`` and the broker answers ``PING`` (embedded: the worker thread
    is alive)."""
    checks: dict[str, str] = {}
    try:
        ping(session.get_bind())  # type: ignore[arg-type]
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unavailable ({type(exc).__name__})"
    try:
        dispatcher.ping()
        checks["broker" if not settings.embedded else "worker"] = "ok"
    except Exception as exc:
        checks["broker" if not settings.embedded else "worker"] = f"unavailable ({type(exc).__name__})"
    ok = all(v == "ok" for v in checks.values())
    body = Health(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(status_code=200 if ok else 503, content=json.loads(body.model_dump_json()))
