"""The HTTP contract around jobs: validation before queueing, 404s, idempotency, listing, auth."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import text

from .helpers import FAST_SPEC, slow_spec, wait_terminal

pytestmark = pytest.mark.service


def _spec(**changes) -> dict:
    return {**FAST_SPEC, **changes}


BAD_SPECS = [
    # (spec or raw body, field named in the error, error code)
    ({k: v for k, v in FAST_SPEC.items() if k != "model"}, "model", "invalid_spec"),
    (_spec(model="no-such-model"), "model", "config_error"),
    (_spec(model="../../etc"), "model", "config_error"),
    (_spec(model="/etc/passwd"), "model", "config_error"),
    (_spec(target_ratio=1.5), "target_ratio", "config_error"),
    (_spec(target_ratio="abc"), "target_ratio", "invalid_spec"),
    (
        _spec(target_ratio=0.85, structures={"attention": True, "mlp": False}),
        "target_ratio",
        "target_not_expressible_error",
    ),
    (_spec(structures={"attention": False, "mlp": False}), "structures", "config_error"),
    (_spec(lora={"rank": 0}), "lora.rank", "config_error"),
    (_spec(lora={"target_modules": ["q_proj", "foo"]}), "lora.target_modules[1]", "config_error"),
    (_spec(lhspg={"mode": "bogus"}), "lhspg.mode", "config_error"),
    (_spec(lhspg="fast"), "lhspg", "invalid_spec"),
    (_spec(data={"calibration": "tinystories/missing.txt"}), "data.calibration", "data_error"),
    (_spec(data={"eval": "tinystories/train_dialogue.txt"}), "data.eval", "config_error"),
    (_spec(adapter="no-such-adapter"), "adapter", "config_error"),
    # zero-shot tasks are checked at submission, never a failed job an hour later (issue 6)
    (_spec(evaluation={"zeroshot": {"tasks": ["piqa", "mmlu"]}}), "evaluation.zeroshot.tasks[1]", "config_error"),
    (_spec(evaluation={"zeroshot": {"task_dir": "tinystories"}}), "evaluation.zeroshot.task_dir", "data_error"),
    (_spec(lhspg={"importance": "oracle"}), "lhspg.importance", "config_error"),
    (_spec(recovery={"distill": 1.5}), "recovery.distill", "config_error"),
    (_spec(runtime={"device": "tpu"}), "runtime.device", "config_error"),
    (_spec(seed=-1), "seed", "config_error"),
    (_spec(version=99), "version", "config_error"),
    ([FAST_SPEC], "body", "invalid_spec"),
    (b'{"model": "stories260K",', "body", "invalid_json"),
]


@pytest.mark.parametrize(("body", "field", "code"), BAD_SPECS, ids=[f"{f}-{c}" for _, f, c in BAD_SPECS])
def test_bad_spec_is_rejected_and_nothing_queued(client, db, redis_client, stack, body, field, code) -> None:
    with db.connect() as conn:
        rows_before = conn.execute(text("SELECT count(*) FROM jobs")).scalar_one()
    queued_before = redis_client.llen(stack.queue)
    if isinstance(body, bytes):
        r = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    else:
        r = client.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert set(err) == {"code", "message", "field"}
    assert err["field"] == field and err["code"] == code
    assert "Traceback" not in r.text and 'File "' not in r.text
    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM jobs")).scalar_one() == rows_before
    assert redis_client.llen(stack.queue) == queued_before


def test_unknown_ids_are_404(client) -> None:
    for method, path in [
        ("GET", "/v1/jobs/job_doesnotexist"),
        ("POST", "/v1/jobs/job_doesnotexist/cancel"),
        ("GET", "/v1/jobs/job_doesnotexist/events"),
        ("GET", "/v1/jobs/job_doesnotexist/events?stream=true"),
        ("GET", "/v1/jobs/job_doesnotexist/metrics"),
        ("GET", "/v1/jobs/job_doesnotexist/artifacts"),
        ("GET", "/v1/jobs/job_doesnotexist/artifacts/art_x/content"),
        ("GET", "/v1/nothing-here"),
    ]:
        r = client.request(method, path)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == "not_found"


def test_idempotency_key(client, db) -> None:
    key = "idem-" + FAST_SPEC["model"] + "-1"
    spec = _spec(seed=7)
    first = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": key})
    second = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": key})
    assert first.status_code == 201 and second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    with db.connect() as conn:
        n = conn.execute(text("SELECT count(*) FROM jobs WHERE idempotency_key = :k"), {"k": key}).scalar_one()
    assert n == 1
    other = client.post("/v1/jobs", json=_spec(seed=8), headers={"Idempotency-Key": key})
    assert other.status_code == 409
    assert other.json()["error"] == {
        "code": "idempotency_key_reused",
        "message": "this Idempotency-Key was already used with a different request body",
        "field": "Idempotency-Key",
    }
    assert wait_terminal(client, first.json()["id"], timeout=600)["status"] == "succeeded"


def test_list_pagination_and_status_filter(client) -> None:
    created = []
    for i in range(5):  # long jobs: the one a worker picks up must still be running when it is cancelled
        r = client.post("/v1/jobs", json={**slow_spec(period_steps=400), "seed": 100 + i})
        assert r.status_code == 201
        created.append(r.json()["id"])
    for job_id in created:  # queued ones are cancelled at once; a running one within a step
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    for job_id in created:
        assert wait_terminal(client, job_id, timeout=300)["status"] == "cancelled"

    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 2, **({"after": cursor} if cursor else {})}
        page = client.get("/v1/jobs", params=params).json()
        assert len(page["data"]) <= 2
        seen += page["data"]
        pages += 1
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        cursor = page["next_cursor"]
    ids = [j["id"] for j in seen]
    assert len(ids) == len(set(ids)) and pages >= 3
    assert [ids.index(j) for j in reversed(created)] == sorted(ids.index(j) for j in created)  # newest first
    keys = [(j["created_at"], j["id"]) for j in seen]
    assert keys == sorted(keys, reverse=True)

    cancelled = client.get("/v1/jobs", params={"status": "cancelled", "limit": 100}).json()["data"]
    assert set(created) <= {j["id"] for j in cancelled}
    assert all(j["status"] == "cancelled" for j in cancelled)
    bad = client.get("/v1/jobs", params={"status": "exploded"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "status"
    bad = client.get("/v1/jobs", params={"after": "not-a-cursor"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "after"
    # Cancelling twice is a no-op.
    assert client.post(f"/v1/jobs/{created[0]}/cancel").json()["status"] == "cancelled"


def test_api_keys_are_required(stack) -> None:
    with httpx.Client(base_url=stack.base_url, timeout=30) as anon:
        r = anon.get("/v1/jobs")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = anon.get("/v1/jobs", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert anon.get("/healthz").status_code == 200
        ready = anon.get("/readyz").json()
        assert ready == {"status": "ok", "checks": {"database": "ok", "broker": "ok"}}
        assert anon.get("/docs").status_code == 200
        paths = anon.get("/openapi.json").json()["paths"]
        assert {
            "/v1/jobs",
            "/v1/jobs/{job_id}",
            "/v1/jobs/{job_id}/cancel",
            "/v1/jobs/{job_id}/events",
            "/v1/jobs/{job_id}/metrics",
            "/v1/jobs/{job_id}/artifacts",
            "/v1/jobs/{job_id}/artifacts/{artifact_id}/content",
            "/healthz",
            "/readyz",
        } <= set(paths)
