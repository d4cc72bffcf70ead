"""The embedded default (SQLite + in-process worker) end to end, and the API importing without torch."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _clean_env(tmp: Path) -> dict[str, str]:
    drop = ("DATABASE_URL", "BROKER_URL", "API_KEY_HASHES", "ARTIFACT_ROOT", "WORK_ROOT", "LORASHEAR_", "VAR_DIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["HOME"] = str(tmp)
    return env


@pytest.mark.service
def test_embedded_demo_runs_a_real_job(tmp_path: Path) -> None:
    """``python -m api.embedded demo``: serve in a subprocess, submit over HTTP, follow SSE, print the result."""
    var = tmp_path / "var"
    proc = subprocess.run(
        [sys.executable, "-m", "api.embedded", "demo", "--var-dir", str(var)],
        cwd=ROOT,
        env=_clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = (var / "serve.log").read_text() if (var / "serve.log").exists() else ""
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}\n--- serve.log ---\n{log[-4000:]}"
    out = proc.stdout
    assert ": succeeded (attempt 1)" in out
    for stage in ("load", "discover", "analyze", "prune", "compress", "recover", "evaluate", "export"):
        assert f"[{stage:>8}] stage_start" in out, stage
    for key in ("params_before", "params_after", "ppl_dense", "ppl_pruned", "ppl_recovered", "compression_ratio"):
        assert key in out
    assert "lhspg/loss" in out and "artifact model" in out
    # The embedded mode used SQLite under the var dir, migrated at startup, and wrote the artifacts there.
    with sqlite3.connect(var / "lorashear.db") as conn:
        rows = conn.execute("SELECT status, attempt FROM jobs").fetchall()
        assert rows == [("succeeded", 1)]
        assert conn.execute("SELECT count(*) FROM alembic_version").fetchone() == (1,)
        (job_id,) = conn.execute("SELECT id FROM jobs").fetchone()
    assert (var / "artifacts" / job_id / "model" / "config.json").is_file()
    assert not (var / "work" / job_id).exists()  # checkpoints removed after success
    assert "Traceback" not in log


NO_TORCH = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch.") or name in ("transformers", "peft"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, BlockTorch())

    import api
    from api.app import create_app
    from fastapi.testclient import TestClient
    from jobs.db import migrate
    from jobs.settings import Settings

    settings = Settings()
    migrate(settings.db_url)
    client = TestClient(create_app(settings))  # no lifespan: the embedded worker thread is not started
    ok = client.post("/v1/jobs", json={"model": "stories260K", "target_ratio": 0.2})
    assert ok.status_code == 201, ok.text
    bad = client.post("/v1/jobs", json={"model": "stories260K", "target_ratio": 0.2, "lora": {"rank": -1}})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "lora.rank", bad.text
    assert client.get(f"/v1/jobs/{ok.json()['id']}").json()["status"] == "queued"
    import jobs.runner, jobs.reconcile, jobs.dispatch  # the task body imports the pipeline only when it runs
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft", "worker")
                    or m == "lorashear.pipeline")
    assert not leaked, leaked
    print("API OK WITHOUT TORCH")
    """
)


def test_api_imports_and_validates_without_torch(tmp_path: Path) -> None:
    env = _clean_env(tmp_path)
    env["VAR_DIR"] = str(tmp_path / "var")
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "API OK WITHOUT TORCH" in proc.stdout
