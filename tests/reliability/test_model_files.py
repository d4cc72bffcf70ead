"""Issue 7 items 4 and 5: broken model directories are the user's fault, refused at submission by the pre-flight
(safetensors headers against config.json) with a code naming the file and tensor, and judged ``user_error`` at
run time too; the worker then takes the next job."""

from __future__ import annotations

import os
import shutil

import httpx
import pytest
from service.helpers import API_KEY, FAST_SPEC, wait_terminal

from . import broken_models
from .conftest import record, stack_env

pytestmark = pytest.mark.service
AUTH = {"Authorization": f"Bearer {API_KEY}"}
REDIS = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
USER_CODES = {"model_file_error", "unsupported_model_error"}


def test_broken_models_refused_at_submission(make_stack, pg_url, tmp_path) -> None:
    models = tmp_path / "models"
    kinds = broken_models.make_all(models)
    env = stack_env(tmp_path, database_url=pg_url, broker_url=REDIS, LORASHEAR_MODEL_ROOT=str(models))
    stack = make_stack(env, worker=False)
    verdicts = {}
    with httpx.Client(base_url=stack.base_url, headers=AUTH, timeout=60) as c:
        for name in ("stories260K", "sharded-ok"):
            r = c.post("/v1/jobs", json={**FAST_SPEC, "model": name})
            assert r.status_code == 201, r.text
            c.post(f"/v1/jobs/{r.json()['id']}/cancel")
        for name in kinds:
            r = c.post("/v1/jobs", json={**FAST_SPEC, "model": name})
            err = r.json().get("error", {})
            verdicts[name] = f"{r.status_code} {err.get('code')}"
            assert r.status_code == 422, (name, r.text)
            assert err["code"] in USER_CODES and err["field"] == "model", (name, err)
            assert str(tmp_path) not in r.text and "Traceback" not in r.text
        too_big = c.post("/v1/jobs", json={**FAST_SPEC, "lhspg": {"batch_size": 4096, "seq_len": 4096}})
        verdicts["estimated-memory-over-machine"] = f"{too_big.status_code} {too_big.json()['error']['code']}"
        assert too_big.status_code == 422 and too_big.json()["error"]["field"] == "lhspg.batch_size"
    record("broken_models_at_submission", {"kinds": len(verdicts), "verdicts": verdicts})
    assert len(verdicts) >= 15


@pytest.mark.parametrize("kind", ["truncated-safetensors", "vocab-mismatch"])
def test_broken_at_run_time_is_a_user_error_and_the_worker_goes_on(make_stack, pg_url, tmp_path, kind) -> None:
    """The files break after the submission passed pre-flight: the job fails as user_error/model_file_error
    naming the file, and the same worker then runs the next job to success."""
    models = tmp_path / "models"
    shutil.copytree(broken_models.SOURCE, models / "stories260K")
    shutil.copytree(broken_models.SOURCE, models / "victim")
    env = stack_env(tmp_path, database_url=pg_url, broker_url=REDIS, LORASHEAR_MODEL_ROOT=str(models))
    stack = make_stack(env, worker=False)
    with httpx.Client(base_url=stack.base_url, headers=AUTH, timeout=60) as c:
        bad = c.post("/v1/jobs", json={**FAST_SPEC, "model": "victim"})
        assert bad.status_code == 201, bad.text
        broken_models.BROKEN[kind](models / "victim")  # broken after submission, before any worker runs it
        stack.start_worker()
        failed = wait_terminal(c, bad.json()["id"], timeout=300)
        good = c.post("/v1/jobs", json=FAST_SPEC).json()
        next_job = wait_terminal(c, good["id"], timeout=600)
    err = failed["error"] or {}
    record(
        f"broken_at_run_time[{kind}]",
        {"verdict": f"{err.get('code')}/{err.get('type')}", "next_job": next_job["status"]},
    )
    assert failed["status"] == "failed" and err["code"] == "user_error" and err["type"] == "model_file_error", failed
    assert "safetensors" in err["message"] and str(tmp_path) not in err["message"]
    assert next_job["status"] == "succeeded"


def test_load_model_maps_a_load_failure_to_a_user_error(tmp_path, monkeypatch) -> None:
    """A file that gets past the header checks but still cannot be loaded is the user's file, not our bug."""
    import lorashear.modeling as modeling
    from lorashear.preflight import ModelFileError

    d = broken_models.make(tmp_path, "truncated-safetensors")
    monkeypatch.setattr(modeling, "check_weights", lambda *a, **k: None)  # as if the header had passed
    with pytest.raises(ModelFileError) as info:
        modeling.load_model(d)
    assert info.value.user_error and info.value.field == "model"
    assert "truncated-safetensors" in info.value.message
