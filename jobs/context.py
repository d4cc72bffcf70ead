"""Per-process database handles for the task body and the reconciler.

Engines must not cross a ``fork`` (Celery's prefork pool forks the worker parent): handles are keyed by process id
and database URL and rebuilt in a child.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from jobs.db import make_engine, make_sessionmaker
from jobs.settings import Settings


@dataclass
class DB:
    """An engine and its session factory."""

    engine: Engine
    sessions: sessionmaker[Session]


_lock = threading.Lock()
_cache: dict[tuple[int, str], DB] = {}


def _reset_lock_in_child() -> None:
    """A forked child gets a fresh lock: the parent's reconciler thread may hold ``_lock`` at the instant Celery's
    prefork pool forks a new job process, and a lock copied while held is never released in the child (the job
    process then hangs before it starts; seen in tests/reliability as a job left ``queued``)."""
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_lock_in_child)


def database(settings: Settings) -> DB:
    """The process's engine for ``settings.db_url`` (created on first use in this process)."""
    key = (os.getpid(), settings.db_url)
    with _lock:
        db = _cache.get(key)
        if db is None:
            for (pid, url), stale in list(_cache.items()):
                if pid != key[0]:  # inherited through fork: drop without closing the parent's connections
                    stale.engine.dispose(close=False)
                    del _cache[(pid, url)]
            engine = make_engine(settings.db_url)
            db = _cache[key] = DB(engine, make_sessionmaker(engine))
        return db
