"""Request dependencies: settings, a database session, the caller's identity and the job service."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from jobs.dispatch import Dispatcher
from jobs.errors import Unauthorized
from jobs.service import JobService
from jobs.settings import Settings

LOCAL_OWNER = "local"
"""Owner of every job when the service runs without API keys (embedded mode on localhost)."""


def get_settings(request: Request) -> Settings:
    """The app's settings."""
    return request.app.state.settings


def get_dispatcher(request: Request) -> Dispatcher:
    """The app's dispatcher (Celery client or embedded worker)."""
    return request.app.state.dispatcher


def get_session(request: Request) -> Iterator[Session]:
    """A session for one request; routes commit explicitly, anything uncommitted is rolled back."""
    session = request.app.state.sessions()
    try:
        yield session
    finally:
        session.close()


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]


def get_owner(
    settings: SettingsDep,
    authorization: Annotated[str | None, Header(description="Bearer <API key>")] = None,
    x_api_key: Annotated[str | None, Header(description="API key (alternative to Authorization)")] = None,
) -> str:
    """The caller's key name; ``local`` when the service runs without keys.

    Raises:
        Unauthorized: keys are configured and the request carries none, or an unknown one.
    """
    if not settings.auth_enabled:
        return LOCAL_OWNER
    key = x_api_key
    if key is None and authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            key = value.strip()
    if not key:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    owner = settings.authenticate(key)
    if owner is None:
        raise Unauthorized("unknown API key")
    return owner


OwnerDep = Annotated[str, Depends(get_owner)]


def get_service(session: SessionDep, settings: SettingsDep, owner: OwnerDep) -> JobService:
    """The job service for this request's owner."""
    return JobService(session, settings, owner)


ServiceDep = Annotated[JobService, Depends(get_service)]
