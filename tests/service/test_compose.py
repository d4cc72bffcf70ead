"""docker-compose.yml runs the very commands the service tests run (no Docker engine is needed to check it)."""

from __future__ import annotations

from pathlib import Path

import yaml

from .commands import API_ARGV, MIGRATE_ARGV, WORKER_ARGV

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_services_and_commands() -> None:
    services = _compose()["services"]
    assert {"postgres", "redis", "migrate", "api", "worker"} <= set(services)
    assert services["migrate"]["command"] == MIGRATE_ARGV
    assert services["worker"]["command"] == WORKER_ARGV
    api = services["api"]["command"]
    assert [a for a in api if a not in ("0.0.0.0", "8000")] == [a for a in API_ARGV if a not in ("{host}", "{port}")]


def test_compose_wiring() -> None:
    services = _compose()["services"]
    # migrate runs once, after postgres is healthy; api and worker wait for it to complete
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == "service_healthy"
        env = services[name]["environment"]
        assert env["DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["BROKER_URL"].startswith("redis://")
    # the worker reserves a GPU; the api image is the one without CUDA torch
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert services["api"]["build"]["target"] == "api" and services["worker"]["build"]["target"] == "worker"
    assert "API_KEY_HASHES" in services["api"]["environment"]


def test_dockerfile_targets() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert " AS api" in text and " AS worker" in text
    api_stage = text.split(" AS api", 1)[1].split(" AS worker", 1)[0]
    assert "download.pytorch.org/whl/cpu" in api_stage  # no CUDA torch in the api image
