"""Fixtures of the reliability suite: private PostgreSQL and Redis instances (on their own ports, in temp
directories) for the tests that stop them, the service stack of ``tests/service`` on top of them, and the figures
every test records, printed at the end of the run."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from service.commands import MIGRATE_ARGV
from service.conftest import ROOT, Stack, _argv, fresh_database, redis_client, stack_env  # noqa: F401  (re-exported)

FIGURES: dict[str, object] = {}
"""Name -> figure; printed by :func:`pytest_terminal_summary` and written to ``$RELIABILITY_FIGURES`` if set."""


def record(name: str, value: object) -> None:
    """Record one figure of the suite."""
    FIGURES[name] = value


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore[no-untyped-def]
    if not FIGURES:
        return
    terminalreporter.section("reliability figures")
    for name, value in FIGURES.items():
        terminalreporter.write_line(f"{name}: {json.dumps(value, sort_keys=True, default=str)}")
    out = os.environ.get("RELIABILITY_FIGURES")
    if out:
        Path(out).write_text(json.dumps(FIGURES, indent=2, sort_keys=True, default=str))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if found:
        return str(found[-1])
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found (install PostgreSQL server binaries)", pytrace=False)
    return path


class PrivatePostgres:
    """A throw-away PostgreSQL cluster on its own port and data directory (trust auth, loopback only). Run as the
    ``postgres`` user when the tests run as root (PostgreSQL refuses root)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="lorashear-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chmod(self.dir, 0o755)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._run([_pg_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"])

    def _run(self, argv: list[str]) -> None:
        subprocess.run([*self.as_user, *argv], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def start(self) -> None:
        """Start (waits until it accepts connections)."""
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run([_pg_bin("pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"), "-w", "start"])

    def stop(self) -> None:
        """Stop at once (``-m fast``: clients are disconnected)."""
        self._run([_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def url(self, db: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{db}"

    def create_db(self, name: str) -> str:
        """Create and migrate database ``name``; returns its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = self.url(name)
        subprocess.run(_argv(MIGRATE_ARGV), cwd=ROOT, env={**os.environ, "DATABASE_URL": url}, check=True)
        return url

    def destroy(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    pg.start()
    try:
        yield pg
    finally:
        pg.destroy()


class PrivateRedis:
    """A throw-away ``redis-server`` on its own port, no persistence (a restart loses every queued message)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="lorashear-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            [*argv, "--dir", str(self.dir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        import redis

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=1).ping():
                    return
            except redis.RedisError:
                time.sleep(0.1)
        raise RuntimeError("private redis did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    r = PrivateRedis()
    r.start()
    try:
        yield r
    finally:
        r.destroy()


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator:
    """Factory of stacks (API and optionally a worker); all are stopped at the end of the test."""
    made: list[Stack] = []

    def _make(env: dict[str, str], *, worker: bool = True) -> Stack:
        s = Stack(env, tmp_path, env["CELERY_QUEUE"])
        made.append(s)
        s.start_api()
        if worker:
            s.start_worker()
        return s

    yield _make
    for s in made:
        s.stop()
        if os.environ.get("SERVICE_TEST_LOGS"):
            for name in ("api", *(f"worker{i}" for i in range(1, s.workers_started + 1))):
                print(f"===== {name} =====\n{s.log(name)}")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh database per test: the 200 jobs the concurrent-POST tests leave queued in a shared database were
    re-sent by the next test's reconciler and ran ahead of that test's own jobs (a Redis-restart and a kill -9 test
    timed out behind them)."""
    with fresh_database() as url:
        yield url
