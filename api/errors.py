"""One error shape, ``{"error": {"code", "message", "field"}}``, for every failure; never a traceback."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from jobs.db import is_unavailable
from jobs.errors import ServiceError

log = logging.getLogger("api")

MAX_MESSAGE = 1000
"""Longest error message sent (a message quoting a huge value is cut, never echoed whole)."""
MAX_FIELD = 200


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, marking the cut."""
    return text if len(text) <= limit else text[: limit - 15] + "... (truncated)"


def error_response(
    status: int, code: str, message: str, field: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """A JSON error response in the API's one shape (message and field length-capped)."""
    body = {
        "error": {
            "code": code,
            "message": clip(message, MAX_MESSAGE),
            "field": clip(field, MAX_FIELD) if field is not None else None,
        }
    }
    return JSONResponse(status_code=status, content=body, headers=headers)


def _retry_after(request: Request) -> dict[str, str]:
    settings = getattr(request.app.state, "settings", None)
    return {"Retry-After": str(getattr(settings, "retry_after", 5))}


def _field(loc: Sequence[Any]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    if not out and loc and loc[0] == "body":
        return "body"
    return out or None


def install(app: FastAPI) -> None:
    """Register the exception handlers on ``app``."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        if exc.status_code in (429, 503):
            headers = _retry_after(request)
        return error_response(exc.status_code, exc.code, exc.message, exc.field, headers)

    @app.exception_handler(SQLAlchemyError)
    async def _database_error(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        if is_unavailable(exc):  # refused or dropped connection, pool exhausted, SQLite busy: try again later
            log.warning("database unavailable on %s %s: %s", request.method, request.url.path, type(exc).__name__)
            return error_response(
                503,
                "database_unavailable",
                "the database is not answering or is saturated; retry after the delay in Retry-After",
                None,
                _retry_after(request),
            )
        return await _unexpected(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        field = _field(first.get("loc", ()))
        if first.get("type") == "json_invalid":
            return error_response(422, "invalid_json", f"request body is not valid JSON: {first.get('msg')}", "body")
        message = f"{field}: {first.get('msg')}" if field else str(first.get("msg"))
        code = "invalid_spec" if first.get("loc", ("",))[0] == "body" else "invalid_request"
        return error_response(422, code, message, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        ref = uuid.uuid4().hex[:12]
        log.error("unhandled error %s on %s %s", ref, request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal_error", f"internal error; reference {ref} in the server log")
