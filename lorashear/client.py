"""Python client of the LoRAShear job service (issue 8). Needs only httpx; imports neither torch nor transformers.

Submit, watch and download in five lines::

    from lorashear.client import Client

    client = Client("http://127.0.0.1:8000", api_key="...")
    job = client.create("examples/stories260k-20.json")
    job = client.wait(job.id)  # a progress bar per stage; raises JobFailed if the job fails
    client.download(job.id, "model", "out/")  # checks every file's SHA-256

Safety of retries: :meth:`Client.create` sends an ``Idempotency-Key`` of its own (one per call), so a retry after
a dropped connection or a 503/429 answer returns the same job instead of creating a second one. Reads are retried
the same way; :meth:`Client.cancel` is idempotent on the server. :meth:`Client.events` follows the Server-Sent
Events stream and resumes after a dropped connection with ``Last-Event-ID``.

Errors: every API error raises a subclass of :class:`APIError` chosen by its ``code`` (:data:`ERROR_TYPES`), or
by its HTTP status for codes this client does not know; it carries ``status``, ``code``, ``message`` and
``field``. Transport failures that outlast the retries raise :class:`ConnectionFailed`.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import httpx

DEFAULT_SERVER = "http://127.0.0.1:8000"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
RETRY_STATUS = frozenset({429, 502, 503, 504})
"""Answers that mean "try again later" (the service sends ``Retry-After`` with 429 and 503)."""
MAX_RETRY_AFTER = 60.0
"""Longest wait honoured from a ``Retry-After`` header (seconds)."""


# -- errors -----------------------------------------------------------------------------------------------------------
class ClientError(Exception):
    """Base of everything this module raises."""


class ConnectionFailed(ClientError):
    """The server could not be reached (or kept dropping the connection) after all retries."""


class JobFailed(ClientError):
    """:meth:`Client.wait` saw the job end ``failed`` or ``cancelled``; ``job`` holds it (``job.error`` says why)."""

    def __init__(self, job: Job) -> None:
        err = job.error
        why = f": {err.code}/{err.type}: {err.message}" if err else ""
        super().__init__(f"job {job.id} {job.status}{why}")
        self.job = job


class ChecksumMismatch(ClientError):
    """A downloaded file's SHA-256 differs from the artifact's manifest; the file was not kept."""


class InvalidInput(ClientError, ValueError):
    """An argument this client refuses before sending anything: a malformed server URL, API key or id, a spec that
    is not a JSON object (or holds NaN), an unreadable spec file, a download destination that is a file."""


class DestinationExists(ClientError, FileExistsError):
    """:meth:`Client.download` would replace an existing file or directory (pass ``overwrite=True`` to allow it)."""


class APIError(ClientError):
    """An error answer of the API, ``{"error": {"code", "message", "field"}}``.

    Attributes:
        status: HTTP status.
        code: the stable machine-readable code (``config_error``, ``not_found``, ...).
        message: what went wrong, for people.
        field: the spec field or request parameter at fault (dotted path), when there is one.
        retry_after: seconds from ``Retry-After`` (429/503), else ``None``.
    """

    status = 0

    def __init__(
        self, status: int, code: str, message: str, field: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{code}: {message}" + (f" (field {field})" if field else ""))
        self.status, self.code, self.message, self.field, self.retry_after = status, code, message, field, retry_after


class BadRequest(APIError):
    """400: a request the service cannot interpret."""

    status = 400


class Unauthorized(APIError):
    """401: missing or unknown API key."""

    status = 401


class NotFound(APIError):
    """404: no such job or artifact (or not yours)."""

    status = 404


class Conflict(APIError):
    """409: the request conflicts with the job's state."""

    status = 409


class ArtifactGone(APIError):
    """410: the artifact's files were removed from the server."""

    status = 410


class PayloadTooLarge(APIError):
    """413: the request body is over the server's limit."""

    status = 413


class UnsupportedMediaType(APIError):
    """415: the body is not JSON."""

    status = 415


class InvalidRequest(APIError):
    """422: the spec or a request parameter is invalid; ``field`` names the culprit."""

    status = 422


class TooManyRequests(APIError):
    """429: too many submissions in progress; retried automatically until the retries run out."""

    status = 429


class ServiceUnavailable(APIError):
    """503: the database or the broker is unavailable; retried automatically until the retries run out."""

    status = 503


class InternalError(APIError):
    """500: a bug on the server; ``message`` holds a reference to quote to its operators."""

    status = 500


def _code_error(name: str, base: type[APIError], doc: str) -> type[APIError]:
    return type(name, (base,), {"__doc__": doc, "__module__": __name__})


# One class per code the service sends (jobs/errors.py, api/errors.py, the library's error classes).
InvalidSpec = _code_error("InvalidSpec", InvalidRequest, "422 invalid_spec: the spec's shape is wrong.")
InvalidJSON = _code_error("InvalidJSON", InvalidRequest, "422 invalid_json: the body is not valid JSON.")
InvalidParameter = _code_error("InvalidParameter", InvalidRequest, "422 invalid_request: a query parameter.")
ConfigError = _code_error("ConfigError", InvalidRequest, "422 config_error: a spec field's value is invalid.")
DataError = _code_error("DataError", InvalidRequest, "422 data_error: the named data cannot be used.")
UnsupportedModel = _code_error(
    "UnsupportedModel", InvalidRequest, "422 unsupported_model_error: the model is not a supported family."
)
TargetNotExpressible = _code_error(
    "TargetNotExpressible",
    InvalidRequest,
    "422 target_not_expressible_error: the target ratio cannot be met with whole structures.",
)
AdapterMismatch = _code_error(
    "AdapterMismatch", InvalidRequest, "422 adapter_mismatch_error: the adapter does not fit the model."
)
IdempotencyKeyReused = _code_error(
    "IdempotencyKeyReused", Conflict, "409 idempotency_key_reused: the key was used with another body."
)
JobFinished = _code_error("JobFinished", Conflict, "409 job_finished: a finished job cannot be cancelled.")
DatabaseUnavailable = _code_error(
    "DatabaseUnavailable", ServiceUnavailable, "503 database_unavailable: the database is not answering."
)

ERROR_TYPES: dict[str, type[APIError]] = {
    "bad_request": BadRequest,
    "unauthorized": Unauthorized,
    "not_found": NotFound,
    "conflict": Conflict,
    "job_finished": JobFinished,
    "idempotency_key_reused": IdempotencyKeyReused,
    "artifact_gone": ArtifactGone,
    "payload_too_large": PayloadTooLarge,
    "body_too_large": PayloadTooLarge,
    "method_not_allowed": BadRequest,
    "http_error": BadRequest,
    "unsupported_media_type": UnsupportedMediaType,
    "invalid_spec": InvalidSpec,
    "invalid_json": InvalidJSON,
    "invalid_request": InvalidParameter,
    "config_error": ConfigError,
    "data_error": DataError,
    "unsupported_model_error": UnsupportedModel,
    "target_not_expressible_error": TargetNotExpressible,
    "adapter_mismatch_error": AdapterMismatch,
    "too_many_requests": TooManyRequests,
    "unavailable": ServiceUnavailable,
    "database_unavailable": DatabaseUnavailable,
    "internal_error": InternalError,
}
"""Exception class per error code."""
_BY_STATUS: dict[int, type[APIError]] = {
    c.status: c
    for c in (
        BadRequest,
        Unauthorized,
        NotFound,
        Conflict,
        ArtifactGone,
        PayloadTooLarge,
        UnsupportedMediaType,
        InvalidRequest,
        TooManyRequests,
        ServiceUnavailable,
        InternalError,
    )
}


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return None if value is None else min(MAX_RETRY_AFTER, max(0.0, float(value)))
    except ValueError:
        return None


def error_from_response(response: httpx.Response) -> APIError:
    """The :class:`APIError` subclass for an error answer (by code, else by status)."""
    try:
        body = response.json()["error"]
        code, message, fld = str(body["code"]), str(body["message"]), body.get("field")
    except (ValueError, KeyError, TypeError):
        code, message, fld = f"http_{response.status_code}", response.text[:500] or response.reason_phrase, None
    cls = ERROR_TYPES.get(code) or _BY_STATUS.get(response.status_code, APIError)
    return cls(response.status_code, code, message, fld, _retry_after(response))


# -- typed results ----------------------------------------------------------------------------------------------------
def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Progress:
    """Steps of the current stage (``step`` of ``total``) and the overall fraction 0-1."""

    step: int
    total: int
    fraction: float


@dataclass(frozen=True)
class JobErrorInfo:
    """Why a job failed: ``code`` ``user_error`` or ``platform_error``; ``type`` the specific cause."""

    code: str
    message: str
    type: str | None = None
    field: str | None = None


@dataclass(frozen=True)
class ArtifactFile:
    """One file of a directory artifact: path inside it, size in bytes, SHA-256."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Artifact:
    """A downloadable output of a finished job (``model``, ``plan``, ``report``, ``adapter``, ``pruned_base``...).

    ``sha256`` is the file's digest, or for a directory the digest of its manifest lines ``<sha256>  <path>``.
    """

    id: str
    job_id: str
    name: str
    kind: str
    size: int
    sha256: str
    files: tuple[ArtifactFile, ...]
    created_at: datetime | None
    download_url: str

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Artifact:
        files = tuple(ArtifactFile(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in d.get("files") or ())
        return cls(
            str(d["id"]),
            str(d["job_id"]),
            str(d["name"]),
            str(d["kind"]),
            int(d["size"]),
            str(d["sha256"]),
            files,
            _time(d.get("created_at")),
            str(d["download_url"]),
        )


@dataclass(frozen=True)
class Job:
    """A job as the service returns it; ``raw`` keeps the JSON object."""

    id: str
    status: str
    stage: str | None
    progress: Progress
    spec: dict[str, Any]
    warnings: list[str]
    attempt: int
    cancel_requested: bool
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    error: JobErrorInfo | None
    summary: dict[str, Any] | None
    artifacts: list[Artifact]
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def terminal(self) -> bool:
        """True once the job is ``succeeded``, ``failed`` or ``cancelled``."""
        return self.status in TERMINAL

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Job:
        p, e = d.get("progress") or {}, d.get("error")
        return cls(
            id=str(d["id"]),
            status=str(d["status"]),
            stage=d.get("stage"),
            progress=Progress(int(p.get("step", 0)), int(p.get("total", 0)), float(p.get("fraction", 0.0))),
            spec=dict(d.get("spec") or {}),
            warnings=list(d.get("warnings") or []),
            attempt=int(d.get("attempt", 0)),
            cancel_requested=bool(d.get("cancel_requested", False)),
            created_at=_time(d.get("created_at")),
            started_at=_time(d.get("started_at")),
            finished_at=_time(d.get("finished_at")),
            error=None if not e else JobErrorInfo(e["code"], e["message"], e.get("type"), e.get("field")),
            summary=d.get("summary"),
            artifacts=[Artifact.from_json(a) for a in d.get("artifacts") or []],
            raw=dict(d),
        )


@dataclass(frozen=True)
class Event:
    """A progress event: ``kind`` is ``stage_start``, ``progress``, ``stage_end`` or ``log``; ``id`` increases."""

    id: int
    stage: str
    kind: str
    step: int
    total: int
    message: str
    metrics: dict[str, float]
    data: dict[str, Any]
    attempt: int
    time: datetime | None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Event:
        return cls(
            int(d["id"]),
            str(d["stage"]),
            str(d["kind"]),
            int(d.get("step", 0)),
            int(d.get("total", 0)),
            str(d.get("message", "")),
            dict(d.get("metrics") or {}),
            dict(d.get("data") or {}),
            int(d.get("attempt", 0)),
            _time(d.get("time")),
        )


@dataclass(frozen=True)
class MetricPoint:
    """One point of a metric series (``lhspg/loss``, ``recovery/loss``, ...)."""

    step: int
    value: float
    time: datetime | None


# -- the client -------------------------------------------------------------------------------------------------------
class Client:
    """A client of the job API (``/v1``).

    Args:
        base_url: the service, e.g. ``http://127.0.0.1:8000`` (default: ``$LORASHEAR_SERVER`` or that).
        api_key: sent as ``Authorization: Bearer`` (default: ``$LORASHEAR_API_KEY``; none if unset).
        timeout: seconds per request (connect and read); streams wait without a read limit.
        retries: attempts after the first on connection errors and 429/502/503/504 answers.
        backoff: first wait between attempts in seconds (doubles, capped at 30 s; ``Retry-After`` wins).
        transport: an httpx transport (tests; e.g. ``httpx.ASGITransport`` is async-only, so pass a real server).
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 5,
        backoff: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        base_url = base_url or os.environ.get("LORASHEAR_SERVER") or DEFAULT_SERVER
        api_key = api_key if api_key is not None else os.environ.get("LORASHEAR_API_KEY")
        try:
            url = httpx.URL(base_url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise InvalidInput(f"server URL {base_url!r}: {exc}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise InvalidInput(f"server URL {base_url!r}: expected http://HOST[:PORT] or https://HOST[:PORT]")
        headers = {"User-Agent": "lorashear-client/1", "Accept": "application/json"}
        if api_key:
            if not api_key.isascii() or not api_key.isprintable() or " " in api_key.strip():
                raise InvalidInput("API key: expected printable ASCII without spaces")
            headers["Authorization"] = f"Bearer {api_key.strip()}"
        self.base_url = base_url.rstrip("/")
        self.retries, self.backoff = max(0, retries), backoff
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport with retries -------------------------------------------------------------------------------------
    def _sleep(self, attempt: int, retry_after: float | None) -> None:
        time.sleep(retry_after if retry_after is not None else min(30.0, self.backoff * 2**attempt))

    def _request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        """One API call, retried on connection errors and retryable answers; errors raised as :class:`APIError`."""
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                r = self._http.request(method, url, **kw)
            except (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.InvalidURL) as exc:
                raise InvalidInput(f"{method} {url}: {exc}") from None
            except (httpx.TransportError, httpx.DecodingError) as exc:
                last = exc
                if attempt < self.retries:
                    self._sleep(attempt, None)
                    continue
                raise ConnectionFailed(f"{method} {self.base_url}{url}: {type(exc).__name__}: {exc}") from exc
            if r.status_code < 400:
                return r
            err = error_from_response(r)
            if r.status_code in RETRY_STATUS and attempt < self.retries:
                self._sleep(attempt, err.retry_after)
                continue
            raise err
        raise ConnectionFailed(str(last))  # pragma: no cover - the loop always returns or raises

    # -- jobs -------------------------------------------------------------------------------------------------------
    def create(
        self,
        spec: Mapping[str, Any] | str | os.PathLike[str],
        *,
        idempotency_key: str | None = None,
        allow_unknown_fields: bool = False,
    ) -> Job:
        """Submit a job.

        Args:
            spec: the job spec as a mapping, or a path to a JSON (or YAML, with PyYAML installed) spec file.
            idempotency_key: reuse a key to make a later call return the same job (default: a new UUID per call,
                reused by this call's own retries).
            allow_unknown_fields: accept unknown spec fields with a warning instead of a 422.

        Returns:
            The job (``queued``; or the earlier job when ``idempotency_key`` was seen before with the same spec).

        Raises:
            InvalidRequest: (a subclass naming the code) the spec is invalid; ``field`` names the culprit.
            IdempotencyKeyReused: the key was used before with another spec.
            ConnectionFailed, APIError: see the module docstring.
        """
        if isinstance(spec, Mapping):
            body = dict(spec)
        elif isinstance(spec, str) and spec.lstrip().startswith("{"):  # JSON text rather than a file name
            try:
                body = json.loads(spec)
            except json.JSONDecodeError as exc:
                raise InvalidInput(f"spec: not valid JSON: {exc}") from None
        elif isinstance(spec, (str, os.PathLike)):
            body = load_spec(spec)
        else:
            raise InvalidInput(f"spec: expected a mapping, JSON text or a file path, got {type(spec).__name__}")
        try:
            content = json.dumps(body, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"spec: not representable as JSON ({exc}); NaN and infinities are not JSON") from None
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4()), "Content-Type": "application/json"}
        params = {"allow_unknown_fields": "true"} if allow_unknown_fields else None
        r = self._request("POST", "/v1/jobs", content=content, headers=headers, params=params)
        return Job.from_json(r.json())

    def get(self, job_id: str) -> Job:
        """One job. Raises :class:`NotFound` for an unknown (or someone else's) job."""
        return Job.from_json(self._request("GET", f"/v1/jobs/{_segment(job_id)}").json())

    def list(self, status: str | None = None, *, page_size: int = 50) -> Iterator[Job]:
        """Your jobs, newest first, following the pages (``status``: only jobs in that state)."""
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": page_size}
            if status:
                params["status"] = status
            if after:
                params["after"] = after
            page = self._request("GET", "/v1/jobs", params=params).json()
            for d in page["data"]:
                yield Job.from_json(d)
            after = page.get("next_cursor")
            if not page.get("has_more") or not after:
                return

    def cancel(self, job_id: str) -> Job:
        """Cancel a job (queued: at once; running: within one pipeline step). Raises :class:`JobFinished` for a
        job that already succeeded or failed."""
        return Job.from_json(self._request("POST", f"/v1/jobs/{_segment(job_id)}/cancel").json())

    def metrics(self, job_id: str, names: Sequence[str] = ()) -> dict[str, builtins.list[MetricPoint]]:
        """Metric series of a job, ``{name: [MetricPoint]}`` (``names``: only these series)."""
        params = [("name", n) for n in names]
        data = self._request("GET", f"/v1/jobs/{_segment(job_id)}/metrics", params=params).json()
        return {
            k: [MetricPoint(int(p["step"]), float(p["value"]), _time(p.get("time"))) for p in v]
            for k, v in data.items()
        }

    def artifacts(self, job_id: str) -> builtins.list[Artifact]:
        """Artifacts of a finished job (empty while it runs)."""
        data = self._request("GET", f"/v1/jobs/{_segment(job_id)}/artifacts").json()
        return [Artifact.from_json(a) for a in data["data"]]

    # -- events -----------------------------------------------------------------------------------------------------
    def events(self, job_id: str, *, after: int = 0, follow: bool = True) -> Iterator[Event]:
        """A job's events, oldest first.

        Args:
            after: only events with ``id > after``.
            follow: follow the Server-Sent Events stream until the job ends (resuming after a dropped connection
                with ``Last-Event-ID``); ``False``: the events stored now, page by page, then stop.
        """
        path = f"/v1/jobs/{_segment(job_id)}/events"
        if not follow:
            while True:
                page = self._request("GET", path, params={"after": after, "limit": 1000}).json()
                for d in page["data"]:
                    ev = Event.from_json(d)
                    after = ev.id
                    yield ev
                if not page.get("has_more"):
                    return
        yield from self._follow(job_id, path, after, None)

    def _follow(self, job_id: str, path: str, after: int, deadline: float | None) -> Iterator[Event]:
        """The SSE stream from ``after`` until ``end``; raises :class:`_Deadline` once ``deadline`` (monotonic)
        passes, even while no event arrives (the server sends a keepalive comment every 15 s)."""

        def lines(r: httpx.Response) -> Iterator[str]:
            for line in r.iter_lines():
                if deadline is not None and time.monotonic() > deadline:
                    raise _Deadline
                yield line

        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if after:
                headers["Last-Event-ID"] = str(after)
            read = None if deadline is None else max(0.5, min(30.0, deadline - time.monotonic()))
            try:
                with self._http.stream(
                    "GET", path, params={"after": after}, headers=headers, timeout=httpx.Timeout(30.0, read=read)
                ) as r:
                    if r.status_code >= 400:
                        r.read()
                        err = error_from_response(r)
                        if r.status_code in RETRY_STATUS and failures < self.retries:
                            failures += 1
                            self._sleep(failures, err.retry_after)
                            continue
                        raise err
                    for name, data, event_id in _sse(lines(r)):
                        failures = 0
                        if name == "end":
                            return
                        if event_id is not None:
                            after = max(after, event_id)
                        yield Event.from_json(json.loads(data))
            except (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.InvalidURL) as exc:
                raise InvalidInput(f"GET {path}: {exc}") from None
            except (httpx.TransportError, httpx.DecodingError) as exc:
                if deadline is not None and time.monotonic() > deadline:
                    raise _Deadline from None
                failures += 1
                if failures > self.retries:
                    raise ConnectionFailed(f"event stream of {job_id}: {type(exc).__name__}: {exc}") from exc
                self._sleep(failures - 1, None)
                continue
            # the stream closed without "end" (a proxy or a server restart): reconnect and resume
            failures += 1
            if failures > self.retries:
                raise ConnectionFailed(f"event stream of {job_id} keeps closing before the job ends")
            self._sleep(failures - 1, None)

    def wait(
        self, job_id: str, *, progress: bool = True, timeout: float | None = None, raise_on_failure: bool = True
    ) -> Job:
        """Follow a job until it ends, with a progress bar per stage (tqdm, on stderr) when ``progress``.

        Args:
            timeout: give up after this many seconds (``TimeoutError``); ``None`` waits as long as it takes.
            raise_on_failure: raise :class:`JobFailed` when the job ends ``failed`` or ``cancelled``.

        Returns:
            The job in its final state.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        bars = _Bars(progress)
        try:
            for ev in self._follow(job_id, f"/v1/jobs/{_segment(job_id)}/events", 0, deadline):
                bars.update(ev)
        except _Deadline:
            raise TimeoutError(f"job {job_id} still {self.get(job_id).status} after {timeout} s") from None
        finally:
            bars.close()
        job = self.get(job_id)
        while not job.terminal:  # the stream ended with the job; the row may lag by a poll
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout} s")
            time.sleep(0.5)
            job = self.get(job_id)
        if raise_on_failure and job.status != "succeeded":
            raise JobFailed(job)
        return job

    # -- downloads --------------------------------------------------------------------------------------------------
    def download(
        self, job_id: str, artifact: str = "model", dest: str | os.PathLike[str] = ".", *, overwrite: bool = False
    ) -> Path:
        """Download an artifact into ``dest`` (a directory, created if needed) and check its SHA-256.

        Args:
            artifact: the artifact's name (``model``, ``plan``, ``report``, ...) or id.
            dest: directory to write into: a file artifact lands as ``dest/<file name>``, a directory artifact as
                ``dest/<name>/``. Nothing is left behind when a check fails.
            overwrite: replace an existing ``dest/<file name>`` or ``dest/<name>/`` (default: refuse, before
                anything is downloaded).

        Returns:
            The path of the downloaded file or directory.

        Raises:
            NotFound: no such artifact (the job has not finished, or the name is unknown).
            ChecksumMismatch: a file's digest (or the manifest's) differs from what the service recorded.
            DestinationExists: the target exists and ``overwrite`` is false.
            InvalidInput: ``dest`` is a file, or cannot be created.
        """
        arts = self.artifacts(job_id)
        match = [a for a in arts if artifact in (a.name, a.id)]
        if not match:
            names = ", ".join(a.name for a in arts) or "none yet"
            raise NotFound(404, "not_found", f"job {job_id} has no artifact {artifact!r} (has: {names})", "artifact")
        art = match[0]
        dest = Path(dest)
        if art.kind != "file":
            _check_target(dest / art.name, overwrite)
        try:
            dest.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise InvalidInput(f"download destination {dest} is a file, not a directory") from None
        except OSError as exc:
            raise InvalidInput(f"download destination {dest}: {exc.strerror or exc}") from None
        url = f"/v1/jobs/{_segment(job_id)}/artifacts/{_segment(art.id)}/content"
        with tempfile.TemporaryDirectory(prefix=".lorashear-download-", dir=dest) as tmp:
            part = Path(tmp) / "download"
            served = self._fetch(url, part)
            if art.kind == "file":
                _check(part, art.sha256, art.name)
                target = dest / (served or art.name)
                _check_target(target, overwrite)
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                part.replace(target)
                return target
            unpacked = Path(tmp) / "unpacked"
            _untar(part, unpacked, art)
            target = dest / art.name
            _check_target(target, overwrite)
            if target.is_symlink() or target.is_file():
                target.unlink()
            elif target.exists():
                shutil.rmtree(target)
            (unpacked / art.name).replace(target)
            return target

    def _fetch(self, url: str, out: Path) -> str | None:
        """Stream ``url`` into ``out``; returns the file name the server gave (Content-Disposition), if safe."""
        for attempt in range(self.retries + 1):
            try:
                with self._http.stream("GET", url, timeout=httpx.Timeout(30.0, read=300.0)) as r:
                    if r.status_code >= 400:
                        r.read()
                        err = error_from_response(r)
                        if r.status_code in RETRY_STATUS and attempt < self.retries:
                            self._sleep(attempt, err.retry_after)
                            continue
                        raise err
                    with out.open("wb") as f:
                        for chunk in r.iter_bytes(1 << 20):
                            f.write(chunk)
                return _disposition_name(r.headers.get("Content-Disposition", ""))
            except (httpx.TransportError, httpx.DecodingError) as exc:
                if attempt >= self.retries:
                    raise ConnectionFailed(f"download {url}: {type(exc).__name__}: {exc}") from exc
                self._sleep(attempt, None)
        raise ConnectionFailed(f"download {url}: no answer after {self.retries + 1} attempts")


# -- helpers ----------------------------------------------------------------------------------------------------------
def load_spec(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A spec file as a dict: JSON, or YAML (``.yaml``/``.yml``, needs PyYAML).

    Raises:
        InvalidInput: the file cannot be read, or is not a JSON (or YAML) object.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"spec file {p}: {getattr(exc, 'strerror', None) or exc}") from None
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml  # type: ignore[import-untyped]

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise InvalidInput(
                f"spec file {p}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}"
            ) from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"spec file {p}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"spec file {p}: a job spec must be an object, got {type(data).__name__}")
    return data


def _segment(value: str) -> str:
    """A path segment (a job or artifact id), refusing anything that would change the URL's path."""
    ok = isinstance(value, str) and 0 < len(value) <= 200 and value.isascii() and value.isprintable()
    if not ok or "/" in value or value in (".", "..") or any(c in value for c in "?#% \\"):
        raise InvalidInput(f"invalid id {str(value)[:80]!r}: expected the id the service returned (e.g. job_...)")
    return value


def _check_target(target: Path, overwrite: bool) -> None:
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise DestinationExists(f"{target} exists; pass overwrite=True (CLI: --overwrite) to replace it")


def _disposition_name(header: str) -> str | None:
    """The ``filename`` of a Content-Disposition header, if it is a plain name (no path, no dot-files)."""
    _, _, rest = header.partition('filename="')
    name = rest.partition('"')[0]
    ok = name and name == Path(name).name and not name.startswith(".") and "\\" not in name
    return name if ok else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check(path: Path, expected: str, what: str) -> None:
    got = _sha256(path)
    if got != expected:
        raise ChecksumMismatch(f"{what}: SHA-256 {got} differs from the service's {expected}")


def _untar(archive: Path, into: Path, art: Artifact) -> None:
    """Unpack a directory artifact's tar, keeping only the manifest's files, each checked against its digest."""
    manifest = {f.path: f for f in art.files}
    lines = "".join(f"{f.sha256}  {f.path}\n" for f in art.files)
    if hashlib.sha256(lines.encode()).hexdigest() != art.sha256:
        raise ChecksumMismatch(f"{art.name}: the manifest does not match its SHA-256 {art.sha256}")
    seen: set[str] = set()
    root = into / art.name
    with tarfile.open(archive, "r:") as tar:
        for member in tar:
            prefix = f"{art.name}/"
            rel = member.name[len(prefix) :] if member.name.startswith(prefix) else None
            if rel is None or rel not in manifest or not member.isfile():
                continue  # only the manifest's regular files; nothing outside <name>/
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            with src, target.open("wb") as f:
                _copy(src, f)
            _check(target, manifest[rel].sha256, f"{art.name}/{rel}")
            seen.add(rel)
    missing = sorted(set(manifest) - seen)
    if missing:
        raise ChecksumMismatch(f"{art.name}: the download lacks {', '.join(missing[:5])}")


def _copy(src: IO[bytes], dst: IO[bytes]) -> None:
    shutil.copyfileobj(src, dst, 1 << 20)


def _sse(lines: Iterator[str]) -> Iterator[tuple[str, str, int | None]]:
    """Server-Sent Events frames ``(event name, data, id)`` from a line iterator (the WHATWG event-stream format:
    ``field: value`` lines, ``:`` comments, a blank line dispatches; ``retry`` is ignored)."""
    name, event_id = "message", None
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield name, "\n".join(data), event_id
            name, event_id = "message", None
            data = []
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "event":
            name = value
        elif key == "data":
            data.append(value)
        elif key == "id" and value.isdigit():
            event_id = int(value)


class _Deadline(Exception):
    """Internal: :meth:`Client.wait`'s timeout passed while following the stream."""


class _Bars:
    """One tqdm bar per stage, driven by events (no-op when disabled or tqdm is missing)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.stage: str | None = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover - tqdm is a dependency of the package
                self.enabled = False
            else:
                self._tqdm = tqdm

    def update(self, ev: Event) -> None:
        if not self.enabled or ev.kind == "log":
            return
        if ev.stage != self.stage or self.bar is None:
            self.close()
            self.stage = ev.stage
            self.bar = self._tqdm(total=ev.total or None, desc=f"{ev.stage:>9}", unit="step", leave=True)
        if ev.total and self.bar.total != ev.total:
            self.bar.total = ev.total
        self.bar.n = ev.step
        if ev.metrics:
            self.bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in list(ev.metrics.items())[:3]})
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
