"""Domain errors of the service. Each carries its HTTP status and a stable code; one API handler renders them as
``{"error": {"code", "message", "field"}}``.
"""

from __future__ import annotations

import re


class ServiceError(Exception):
    """Root of the service's errors.

    Attributes:
        status_code: HTTP status the API answers with.
        code: stable machine-readable code.
        message: one human-readable sentence (never a traceback).
        field: the request field at fault, dotted (``lhspg.periods``), or ``None``.
    """

    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code


class InvalidSpec(ServiceError):
    """The job spec failed validation or pre-flight (422); ``code`` names the library error class."""

    status_code = 422
    code = "invalid_spec"


class NotFound(ServiceError):
    """No such job or artifact (for this API key)."""

    status_code = 404
    code = "not_found"


class Conflict(ServiceError):
    """The request conflicts with the job's state or an earlier request (409)."""

    status_code = 409
    code = "conflict"


class Unauthorized(ServiceError):
    """Missing or unknown API key (401)."""

    status_code = 401
    code = "unauthorized"


class Unavailable(ServiceError):
    """A dependency (database, broker) does not answer (503)."""

    status_code = 503
    code = "unavailable"


def snake_case(name: str) -> str:
    """``TargetNotExpressibleError`` -> ``target_not_expressible_error``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()
