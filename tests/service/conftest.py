"""A real stack for the service tests: a fresh PostgreSQL database built by the migrations, a dedicated Redis db
and queue, the API under uvicorn and a Celery worker, each a subprocess started with the commands of
``docker-compose.yml``.

PostgreSQL and Redis must be running (``.ci/run`` starts them); when they are not, the tests fail with a message
saying so, they are never skipped. ``TEST_PG_URL`` (admin connection, default
``postgresql://postgres@127.0.0.1:5432/postgres``) and ``TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/13``)
point elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .commands import MIGRATE_ARGV, WORKER_ARGV, api_argv
from .helpers import API_KEY

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = os.environ.get("TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
BIN = Path(sys.executable).parent


def _bin(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else name


def _argv(argv: list[str]) -> list[str]:
    return [_bin(argv[0]), *argv[1:]]


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """A fresh database ``lorashear_test_<hex>`` migrated with the compose ``migrate`` command; dropped after."""
    import psycopg

    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not answering at {PG_ADMIN_URL} ({exc}); start it (.ci/run does)", pytrace=False)
    name = f"lorashear_test_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    url = f"{base}/{name}"
    try:
        subprocess.run(_argv(MIGRATE_ARGV), cwd=ROOT, env={**os.environ, "DATABASE_URL": url}, check=True)
        yield url
    finally:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """One fresh migrated database for the service tests (:func:`fresh_database`)."""
    with fresh_database() as url:
        yield url


@pytest.fixture(scope="session")
def redis_client():
    """A client of the dedicated test Redis db; fails clearly when Redis is down."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not answering at {REDIS_URL} ({exc}); start it (.ci/run does)", pytrace=False)
    yield client
    client.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    """The running API and worker processes and their environment."""

    def __init__(self, env: dict[str, str], tmp: Path, queue: str) -> None:
        self.env = env
        self.tmp = tmp
        self.queue = queue
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.workers_started = 0

    def _spawn(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as fh:
            return subprocess.Popen(
                _argv(argv), cwd=ROOT, env=self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )

    def start_api(self) -> None:
        """Start uvicorn and wait for ``/readyz``."""
        self.api = self._spawn(api_argv("127.0.0.1", self.port), self.tmp / "api.log")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.api.poll() is not None:
                raise RuntimeError(f"the API exited ({self.api.returncode}):\n{self.log('api')}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the API did not become ready:\n{self.log('api')}")

    def start_worker(self) -> None:
        """Start a Celery worker and wait until it reports ready."""
        self.workers_started += 1
        log = self.tmp / f"worker{self.workers_started}.log"
        self.worker = self._spawn(WORKER_ARGV, log)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.worker.poll() is not None:
                raise RuntimeError(f"the worker exited ({self.worker.returncode}):\n{log.read_text()[-5000:]}")
            if " ready." in log.read_text(errors="replace"):
                return
            time.sleep(0.2)
        raise RuntimeError(f"the worker did not become ready:\n{log.read_text()[-5000:]}")

    def kill_worker(self) -> None:
        """``kill -9`` the worker's whole process group (parent and pool process), as a dying node would."""
        assert self.worker is not None
        os.killpg(self.worker.pid, signal.SIGKILL)
        self.worker.wait(timeout=30)

    def stop(self) -> None:
        """Terminate the processes (TERM, then KILL)."""
        for proc in (self.worker, self.api):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in (self.worker, self.api):
            if proc is not None:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()

    def log(self, name: str) -> str:
        """Tail of a process log (``api``, ``worker1``...)."""
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace")[-8000:] if path.exists() else ""


def stack_env(tmp: Path, *, database_url: str, broker_url: str, **extra: str) -> dict[str, str]:
    """The service stack's environment: a per-run queue, roots under ``tmp``, the test API key, short heartbeat and
    reconcile intervals, one torch thread; ``extra`` overrides any of it."""
    from jobs.settings import hash_key

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("LORASHEAR_", "VAR_DIR"))},
        "DATABASE_URL": database_url,
        "BROKER_URL": broker_url,
        "CELERY_QUEUE": f"lorashear-test-{uuid.uuid4().hex[:8]}",
        "ARTIFACT_ROOT": str(tmp / "artifacts"),
        "WORK_ROOT": str(tmp / "work"),
        "VAR_DIR": str(tmp / "var"),
        "API_KEY_HASHES": f"tests:{hash_key(API_KEY)}",
        "HEARTBEAT_INTERVAL": "1",
        "STALE_AFTER": "6",
        "RECONCILE_INTERVAL": "2",
        "REQUEUE_QUEUED_AFTER": "8",
        "JOB_TIME_LIMIT": "900",
        "SSE_POLL_INTERVAL": "0.2",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def stack(pg_url: str, redis_client, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API + worker on PostgreSQL and Redis, with short heartbeat/reconcile intervals."""
    tmp = tmp_path_factory.mktemp("stack")
    env = stack_env(tmp, database_url=pg_url, broker_url=REDIS_URL, REQUEUE_QUEUED_AFTER="20", OMP_NUM_THREADS="2")
    queue = env["CELERY_QUEUE"]
    s = Stack(env, tmp, queue)
    try:
        s.start_api()
        s.start_worker()
        yield s
    finally:
        s.stop()
        redis_client.delete(queue)
        if os.environ.get("SERVICE_TEST_LOGS"):
            for name in ("api", *(f"worker{i}" for i in range(1, s.workers_started + 1))):
                print(f"===== {name} =====\n{s.log(name)}")


@pytest.fixture
def client(stack: Stack) -> Iterator[httpx.Client]:
    """An authenticated HTTP client of the API."""
    with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture
def db(pg_url: str):
    """A SQLAlchemy engine on the test database (to count rows behind the API's back)."""
    from sqlalchemy import create_engine

    engine = create_engine(pg_url)
    yield engine
    engine.dispose()
