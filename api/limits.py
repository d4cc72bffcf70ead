"""Request limits applied before any route runs: body size (413), media type (415), UTF-8 (422), and the
admission limit of job submissions (429)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
from jobs.errors import ServiceError

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _is_json(content_type: str | None) -> bool:
    """``application/json`` or ``application/<x>+json`` (parameters such as charset ignored); a missing header
    counts as JSON, as FastAPI reads it."""
    if not content_type:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class BodyGuard:
    """Pure ASGI middleware: refuses a body over ``max_bytes`` with 413 (from ``Content-Length`` before reading,
    or while reading a chunked body), and on ``json_paths`` a non-JSON ``Content-Type`` with 415 and a body that
    is not UTF-8 with 422 ``invalid_json``. The accepted body is replayed to the app unchanged."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, json_paths: tuple[str, ...] = ()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.json_paths = json_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        too_big = error_response(
            413, "body_too_large", f"the request body exceeds {self.max_bytes} bytes", "body", {"Connection": "close"}
        )
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await too_big(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await too_big(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if body and scope["path"].rstrip("/") in self.json_paths:
            if not _is_json(headers.get("content-type")):
                await error_response(
                    415,
                    "unsupported_media_type",
                    "the request body must be JSON (Content-Type: application/json)",
                    "Content-Type",
                )(scope, receive, send)
                return
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as exc:
                message_text = f"request body is not valid JSON: not UTF-8 text at byte {exc.start}"
                await error_response(422, "invalid_json", message_text, "body")(scope, receive, send)
                return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class TooManyRequests(ServiceError):
    """Too many submissions are being validated at once (429, with ``Retry-After``)."""

    status_code = 429
    code = "too_many_requests"


class Admission:
    """Bounds the job submissions one API process validates or waits for at once. Validation runs in worker
    threads without a database connection; this keeps a burst from queueing without bound (those over the
    limit answer 429 with ``Retry-After`` at once)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._inside = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of ``limit`` places for the duration of a submission."""
        if self._inside >= self.limit:
            raise TooManyRequests(f"more than {self.limit} job submissions are in progress; retry shortly")
        self._inside += 1
        try:
            yield
        finally:
            self._inside -= 1
