"""The FastAPI application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from api import errors, ui
from api.limits import Admission, BodyGuard
from api.metrics import RequestMetrics, make_registry
from api.routes import catalog, health, router
from jobs.db import make_engine, make_sessionmaker, migrate
from jobs.dispatch import Dispatcher, EmbeddedDispatcher, make_dispatcher
from jobs.settings import Settings, get_settings

log = logging.getLogger("api")

DESCRIPTION = """Prune LoRA-adapted LLaMA-family models with LoRAShear as background jobs.

Submit a job spec (the JSON that `lorashear run` reads), follow its events and metrics, and download the pruned
model. Errors always have the shape `{"error": {"code", "message", "field"}}`.
"""


def create_app(settings: Settings | None = None, *, dispatcher: Dispatcher | None = None) -> FastAPI:
    """Build the API.

    Args:
        settings: service settings (default: from the environment). Checked with
            :meth:`~jobs.settings.Settings.check_secure` at startup.
        dispatcher: how jobs reach workers (default: Celery when ``BROKER_URL`` is set, else an embedded worker
            thread started with the app). In the embedded mode the SQLite database is migrated at startup.

    Returns:
        The application; serve it with ``uvicorn --factory api.app:create_app``.
    """
    settings = settings or get_settings()
    settings.check_secure()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.db_url.startswith("sqlite") and settings.embedded:
            migrate(settings.db_url)
        disp = app.state.dispatcher
        if isinstance(disp, EmbeddedDispatcher):
            disp.start()
        log.info("lorashear API ready (%s mode)", "embedded" if settings.embedded else "celery")
        try:
            yield
        finally:
            disp.close()
            app.state.engine.dispose()

    # Swagger UI's script and style are served from the fastapi-offline package: /docs works without internet
    app = FastAPIOffline(
        title="LoRAShear pruning jobs",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
        static_url="/static/docs",
        swagger_ui_parameters={"validatorUrl": None},  # no call to validator.swagger.io: fully offline
    )
    engine = make_engine(
        settings.db_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = make_sessionmaker(engine)
    app.state.dispatcher = dispatcher or make_dispatcher(settings)
    app.state.admission = Admission(settings.max_pending_submissions)
    app.state.metrics_registry, latency = make_registry(app.state.sessions)
    errors.install(app)
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes, json_paths=("/v1/jobs",))
    app.add_middleware(RequestMetrics, histogram=latency)
    app.include_router(router)
    app.include_router(catalog)
    app.include_router(health)
    ui.install(app)
    return app
