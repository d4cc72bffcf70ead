"""The HTTP API of the pruning-job service (FastAPI).

``create_app()`` builds the application; ``uvicorn --factory api.app:create_app`` serves it, and
``python -m api.embedded serve`` runs it with SQLite and an in-process worker. This package never imports torch,
the worker, or ``lorashear.pipeline``: it validates specs with the library's standard-library config and pre-flight.
"""

from api.app import create_app

__all__ = ["create_app"]
