"""The commands the service tests run; ``test_compose.py`` checks that docker-compose.yml runs the same ones."""

MIGRATE_ARGV = ["alembic", "-c", "migrations/alembic.ini", "upgrade", "head"]
"""One-shot migration (compose service ``migrate``)."""

WORKER_ARGV = ["celery", "-A", "worker.celery_app", "worker", "--loglevel=INFO"]
"""One Celery worker (compose service ``worker``); queue, concurrency and prefetch come from the settings."""

API_ARGV = ["uvicorn", "api.app:create_app", "--factory", "--host", "{host}", "--port", "{port}"]
"""The API server (compose service ``api``); ``{host}``/``{port}`` differ between compose and the tests."""


def api_argv(host: str, port: int) -> list[str]:
    """:data:`API_ARGV` with the address filled in."""
    return [a.format(host=host, port=port) for a in API_ARGV]
