"""Cancel while running, and a worker killed with SIGKILL mid-job: re-queued, resumed, succeeded."""

from __future__ import annotations

import pytest

from .helpers import slow_spec, wait_for, wait_terminal

pytestmark = pytest.mark.service


def _prune_step(job: dict) -> int:
    return job["progress"]["step"] if job["stage"] == "prune" else 0


def test_cancel_while_running(client) -> None:
    job = client.post("/v1/jobs", json=slow_spec(period_steps=200)).json()
    running = wait_for(client, job["id"], lambda j: _prune_step(j) >= 3, 300, "the prune stage")
    assert running["status"] == "running"
    r = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200
    assert r.json()["cancel_requested"] is True
    done = wait_terminal(client, job["id"], timeout=60)
    assert done["status"] == "cancelled" and done["error"] is None
    assert done["progress"]["step"] < 400  # stopped long before the end of the stage
    assert done["artifacts"] == []
    after = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert after.status_code == 200 and after.json()["status"] == "cancelled"


def test_worker_killed_mid_job_resumes_and_succeeds(client, stack) -> None:
    job = client.post("/v1/jobs", json=slow_spec(period_steps=30)).json()
    wait_for(client, job["id"], lambda j: _prune_step(j) >= 8, 300, "the prune stage to pass a checkpoint")
    stack.kill_worker()
    killed = client.get(f"/v1/jobs/{job['id']}").json()
    assert killed["status"] == "running" and killed["attempt"] == 1  # nobody knows yet

    stack.start_worker()  # its reconciler sees the stale heartbeat and re-queues the job
    done = wait_terminal(client, job["id"], timeout=600)
    assert done["status"] == "succeeded", f"{done}\n{stack.log(f'worker{stack.workers_started}')}"
    assert done["attempt"] == 2
    events = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
    messages = [e["message"] for e in events if e["kind"] == "log"]
    assert any("lost" in m and "re-queued for attempt 2" in m for m in messages), messages
    second = [e for e in events if e["attempt"] == 2]
    assert any("resumed" in e["message"] for e in second), [e["message"] for e in second][:10]
    # Attempt 2 continued the prune stage from the checkpoint instead of starting it over.
    prune_steps = [e["step"] for e in second if e["stage"] == "prune" and e["kind"] == "progress"]
    assert prune_steps and min(prune_steps) > 1
