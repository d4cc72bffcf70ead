"""Service settings (pydantic-settings), read from the environment.

With nothing set the service runs in the *embedded* mode: a SQLite file under ``VAR_DIR`` and an in-process worker
thread. Setting ``BROKER_URL`` (Redis) switches to Celery workers; production also sets ``DATABASE_URL``
(PostgreSQL) and ``API_KEY_HASHES``.

API keys are never stored in clear: ``API_KEY_HASHES`` lists ``name:sha256hex`` entries (or bare hex digests),
the SHA-256 of each key. ``python -m jobs.settings hash-key KEY`` prints the entry for a key.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import sys
from functools import cached_property
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_HEX64 = re.compile(r"^[0-9a-f]{64}$")

# SHA-256 of keys that appear in examples and templates; refused so that nobody deploys one by accident.
_PLACEHOLDER_KEYS = ("", "changeme", "change-me", "secret", "password", "test", "example", "dev", "admin", "key")
PLACEHOLDER_HASHES = frozenset(hashlib.sha256(k.encode()).hexdigest() for k in _PLACEHOLDER_KEYS)


class SettingsError(ValueError):
    """The settings are unsafe or inconsistent (e.g. no API keys on a public address); the message says which."""


def hash_key(key: str) -> str:
    """SHA-256 hex digest of an API key, as stored in ``API_KEY_HASHES``."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class Settings(BaseSettings):
    """Everything the API, the worker and the migrations read from the environment.

    Attributes are documented by their ``description``; the README's configuration table lists them.
    """

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    var_dir: Path = Field(Path("var"), description="Directory for the embedded defaults (SQLite file, artifacts).")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db; default: SQLite in VAR_DIR."
    )
    broker_url: str | None = Field(
        None, description="Celery broker (redis://host:6379/0); unset = embedded in-process worker thread."
    )
    celery_queue: str = Field("lorashear", description="Dedicated Celery queue of pruning jobs.")
    artifact_root: Path | None = Field(None, description="Finished jobs' outputs, ARTIFACT_ROOT/<job id>/.")
    work_root: Path | None = Field(None, description="Checkpoints of running jobs, WORK_ROOT/<job id>/.")
    model_root: Path | None = Field(
        None,
        validation_alias=AliasChoices("LORASHEAR_MODEL_ROOT", "model_root"),
        description="Directory that spec model/adapter names resolve under; default: the bundled models.",
    )
    data_root: Path | None = Field(
        None,
        validation_alias=AliasChoices("LORASHEAR_DATA_ROOT", "data_root"),
        description="Directory that spec data file names resolve under; default: the bundled data.",
    )
    api_key_hashes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated 'name:sha256hex' (or bare sha256hex) entries of accepted API keys.",
    )
    allow_anonymous: bool = Field(
        False, description="Accept requests without a key on a non-loopback address (never in production)."
    )
    bind_host: str = Field("127.0.0.1", description="Address the API listens on (checked against key policy).")
    job_time_limit: int = Field(24 * 3600, description="Hard time limit of one job attempt, seconds.")
    heartbeat_interval: float = Field(10.0, description="Seconds between a running job's heartbeats.")
    stale_after: float = Field(120.0, description="A running job without heartbeat for this long is re-queued.")
    requeue_queued_after: float = Field(
        600.0, description="A queued job not seen in the broker for this long is re-sent."
    )
    reconcile_interval: float = Field(30.0, description="Seconds between reconciler passes; 0 disables it.")
    max_attempts: int = Field(3, description="Attempts before a job whose worker keeps dying is failed.")
    keep_work_dirs: bool = Field(False, description="Keep checkpoints after a job ends (debugging).")
    sse_poll_interval: float = Field(0.5, description="Seconds between database polls of an event stream.")
    db_outage_tolerance: float = Field(
        3600.0,
        description="Seconds a worker keeps computing and retrying while the database does not answer (events are "
        "buffered and written when it is back); the reconciler judges no heartbeat stale until it has reached the "
        "database for STALE_AFTER seconds again.",
    )
    db_pool_size: int = Field(5, description="Database connections each process keeps open (PostgreSQL).")
    db_max_overflow: int = Field(10, description="Extra connections a process may open under load (PostgreSQL).")
    db_pool_timeout: float = Field(
        30.0, description="Seconds a request waits for a database connection before answering 503."
    )
    max_body_bytes: int = Field(1 << 20, description="Largest request body accepted (413 above it).")
    max_pending_submissions: int = Field(
        256,
        description="Job submissions validated or waiting at once per API process; more answer 429 with Retry-After.",
    )
    worker_memory_bytes: int = Field(
        0,
        description="Memory one worker has for a job; a job whose estimated peak exceeds it is refused at "
        "submission (0: this machine's physical memory).",
    )
    retry_after: int = Field(5, description="Seconds a 429/503 answer asks the client to wait (Retry-After).")

    @field_validator("api_key_hashes", mode="before")
    @classmethod
    def _split_hashes(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("api_key_hashes")
    @classmethod
    def _check_hashes(cls, value: list[str]) -> list[str]:
        for entry in value:
            digest = entry.rpartition(":")[2].lower()
            if not _HEX64.match(digest):
                raise ValueError(f"API_KEY_HASHES entry {entry!r} is not 'name:<64 hex digits of sha256>'")
            if digest in PLACEHOLDER_HASHES:
                raise ValueError(f"API_KEY_HASHES entry {entry!r} is the hash of a placeholder key; pick a real one")
        return value

    @field_validator("job_time_limit", "max_attempts", "db_pool_size", "max_body_bytes", "max_pending_submissions")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be >= 1")
        return value

    # ---- derived values -------------------------------------------------------------------------------------------

    @property
    def embedded(self) -> bool:
        """True when no broker is configured: jobs run on an in-process worker thread."""
        return not self.broker_url

    @property
    def db_url(self) -> str:
        """The database URL, defaulting to ``sqlite:///VAR_DIR/lorashear.db`` (absolute)."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.var_dir / 'lorashear.db').resolve()}"

    @property
    def artifacts_dir(self) -> Path:
        """Absolute ``ARTIFACT_ROOT`` (default ``VAR_DIR/artifacts``)."""
        return (self.artifact_root or self.var_dir / "artifacts").resolve()

    @property
    def work_dir(self) -> Path:
        """Absolute ``WORK_ROOT`` (default ``VAR_DIR/work``)."""
        return (self.work_root or self.var_dir / "work").resolve()

    @property
    def visibility_timeout(self) -> int:
        """Redis visibility timeout: above the longest job, so an unacked long job is not redelivered early."""
        return self.job_time_limit + 3600

    @cached_property
    def key_table(self) -> dict[str, str]:
        """``{sha256 hex: key name}`` of the accepted keys (a bare digest is named by its first 8 digits)."""
        table: dict[str, str] = {}
        for entry in self.api_key_hashes:
            name, _, digest = entry.rpartition(":")
            digest = digest.lower()
            table[digest] = name or digest[:8]
        return table

    @property
    def auth_enabled(self) -> bool:
        """True when API keys are configured and every request must carry one."""
        return bool(self.api_key_hashes)

    def authenticate(self, key: str) -> str | None:
        """Name of the key's owner, or ``None`` when ``key`` is not accepted (constant-time comparison)."""
        digest = hash_key(key)
        found = None
        for known, name in self.key_table.items():
            if hmac.compare_digest(known, digest):
                found = name
        return found

    def roots(self):  # -> lorashear.resolve.Roots (imported lazily to keep this module light)
        """The model and data roots that spec names resolve under."""
        from lorashear.resolve import BUNDLED_DATA_ROOT, BUNDLED_MODEL_ROOT, Roots

        return Roots(
            (self.model_root or BUNDLED_MODEL_ROOT).resolve(),
            (self.data_root or BUNDLED_DATA_ROOT).resolve(),
        )

    def check_secure(self) -> None:
        """Refuse to serve without API keys anywhere but the embedded mode on a loopback address.

        Raises:
            SettingsError: no ``API_KEY_HASHES`` while a broker is configured or the bind address is not
                loopback, unless ``ALLOW_ANONYMOUS`` is set explicitly.
        """
        if self.auth_enabled or self.allow_anonymous:
            return
        if not self.embedded:
            raise SettingsError(
                "API_KEY_HASHES is empty: set it (python -m jobs.settings hash-key KEY) when BROKER_URL is set; "
                "only the embedded mode on localhost may run without keys"
            )
        if not _is_loopback(self.bind_host):
            raise SettingsError(
                f"API_KEY_HASHES is empty and the API binds {self.bind_host!r}, which is not a loopback address"
            )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def get_settings() -> Settings:
    """Settings read from the environment now (not cached: tests and subprocesses set the environment)."""
    return Settings()  # type: ignore[call-arg]  # every field has a default or comes from the environment


def _main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[1] == "hash-key":
        print(f"{argv[2].split(':')[0] if ':' in argv[2] else 'key'}:{hash_key(argv[2].split(':')[-1])}")
        return 0
    print("usage: python -m jobs.settings hash-key [NAME:]KEY", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv))
