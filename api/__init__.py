"""The HTTP API of the pruning-job service (FastAPI).

``create_app()`` builds the application; ``uvicorn --factory api.app:create_app`` serves it, and
``python -m api.embedded serve`` runs it with SQLite and an in-process worker. This package never imports torch,
the worker, or ``lorashear.pipeline``: it validates specs with the library's standard-library config and pre-flight.
Importing the package itself is cheap (FastAPI loads with :func:`create_app`), so the ``lorashear`` CLI can list the
service's commands (:func:`api.embedded.add_commands`) without starting anything.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from api.app import create_app

        return create_app
    raise AttributeError(f"module 'api' has no attribute {name!r}")
