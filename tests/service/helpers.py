"""Shared values and polling helpers of the service tests."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest

API_KEY = "test-" + uuid.uuid4().hex
"""The key the test client sends; the stack accepts only its hash."""

FAST_SPEC: dict[str, Any] = {
    "model": "stories260K",
    "target_ratio": 0.2,
    "lhspg": {"warmup_steps": 2, "periods": 2, "period_steps": 3, "batch_size": 4, "seq_len": 64},
    "recovery": {"rounds": 1, "steps_per_round": 3, "batch_size": 4, "seq_len": 64},
    "analysis": {"max_tokens": 2048},
    "evaluation": {"max_windows": 8},
}
"""A job on the bundled stories260K that takes ~15 s on two CPU cores."""


def slow_spec(period_steps: int = 60) -> dict[str, Any]:
    """A job whose prune stage runs long enough to cancel or kill it mid-way (checkpoints every 5 steps)."""
    spec = {**FAST_SPEC, "lhspg": {**FAST_SPEC["lhspg"], "period_steps": period_steps}}
    spec["runtime"] = {"checkpoint_every": 5}
    return spec


def wait_for(client: httpx.Client, job_id: str, predicate, timeout: float = 300.0, what: str = "") -> dict:
    """Poll ``GET /v1/jobs/{id}`` until ``predicate(job)``; fail with the job JSON on timeout."""
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if predicate(job):
            return job
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what or 'the job'}: {job}")


def wait_terminal(client: httpx.Client, job_id: str, timeout: float = 300.0) -> dict:
    """Wait until the job is succeeded, failed or cancelled."""
    return wait_for(
        client, job_id, lambda j: j["status"] in ("succeeded", "failed", "cancelled"), timeout, "a terminal state"
    )
