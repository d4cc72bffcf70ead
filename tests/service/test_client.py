"""The Python client and the ``lorashear jobs`` CLI against the real stack (API + Celery worker on PostgreSQL and
Redis), ``/metrics`` scraped and parsed, the catalog routes and the offline ``/docs`` (issue 8)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lorashear import client as lc

from .conftest import ROOT
from .helpers import API_KEY, FAST_SPEC

pytestmark = pytest.mark.service


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_client_submits_watches_and_downloads_a_real_job(stack, tmp_path: Path) -> None:
    """The README's five lines: create, wait (SSE), download with digests checked; plus get, list, events,
    metrics and artifacts as typed results."""
    with lc.Client(stack.base_url, api_key=API_KEY) as c:
        job = c.create(FAST_SPEC)
        assert job.status == "queued" and job.id.startswith("job_")
        done = c.wait(job.id, progress=False, timeout=600)
        assert done.status == "succeeded" and done.terminal
        assert 0.15 < done.summary["compression_ratio"] < 0.25
        model_dir = c.download(job.id, "model", tmp_path / "dl")
        plan = c.download(job.id, "plan", tmp_path / "dl")

        arts = {a.name: a for a in c.artifacts(job.id)}
        assert model_dir == tmp_path / "dl" / "model" and (model_dir / "config.json").is_file()
        for f in arts["model"].files:  # every manifest file, byte for byte
            assert _sha(model_dir / f.path) == f.sha256
        assert plan.is_file() and _sha(plan) == arts["plan"].sha256 and json.loads(plan.read_text())
        assert not [p for p in (tmp_path / "dl").iterdir() if p.name.startswith(".")]  # no temporary left

        events = list(c.events(job.id, follow=False))
        assert [e.id for e in events] == sorted(e.id for e in events)
        assert {"load", "prune", "recover", "export"} <= {e.stage for e in events}
        assert list(c.events(job.id)) == events  # the SSE stream of a finished job replays the same events
        resumed = list(c.events(job.id, after=events[5].id))
        assert resumed == events[6:]

        series = c.metrics(job.id)
        assert series["lhspg/loss"] and all(isinstance(p, lc.MetricPoint) for p in series["lhspg/loss"])
        assert c.get(job.id) == done
        assert job.id in [j.id for j in c.list(page_size=1)]  # follows the cursor across pages
        assert job.id in [j.id for j in c.list(status="succeeded")]


def test_client_errors_are_typed(stack) -> None:
    with lc.Client(stack.base_url, api_key=API_KEY, retries=0) as c:
        with pytest.raises(lc.ConfigError) as bad:
            c.create({**FAST_SPEC, "lora": {"rank": -1}})
        assert bad.value.status == 422 and bad.value.field == "lora.rank"
        with pytest.raises(lc.NotFound):
            c.get("job_doesnotexist")
        key = "same-key-" + os.urandom(4).hex()
        first = c.create(FAST_SPEC, idempotency_key=key)
        assert c.create(FAST_SPEC, idempotency_key=key).id == first.id  # a retry returns the same job
        with pytest.raises(lc.IdempotencyKeyReused):
            c.create({**FAST_SPEC, "seed": 7}, idempotency_key=key)
        cancelled = c.cancel(first.id)
        assert cancelled.status == "cancelled" or cancelled.cancel_requested
        final = c.wait(first.id, progress=False, timeout=600, raise_on_failure=False)
        if final.status == "succeeded":  # it won the race
            with pytest.raises(lc.JobFinished):
                c.cancel(first.id)
        else:
            assert final.status == "cancelled"
            with pytest.raises(lc.JobFailed):
                c.wait(first.id, progress=False)
    with lc.Client(stack.base_url, api_key="wrong", retries=0) as c, pytest.raises(lc.Unauthorized):
        c.get("job_x")


def _cli(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LORASHEAR_API_KEY": API_KEY, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "lorashear.cli", "jobs", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_cli_submit_wait_get_list_download(stack, tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(FAST_SPEC))
    run = _cli("submit", str(spec), "--server", stack.base_url, "--wait", "--download", str(tmp_path / "got"))
    assert run.returncode == 0, run.stderr  # the README's one line: submit, watch, download
    assert (tmp_path / "got" / "model" / "config.json").is_file() and (tmp_path / "got" / "report.png").is_file()
    job_id, status = run.stdout.split()[:2]
    assert status == "succeeded" and "removed " in run.stdout and "ppl " in run.stdout
    assert "recover" in run.stderr  # the progress bars, one per stage
    got = _cli("get", job_id, "--server", stack.base_url, "--json")
    assert got.returncode == 0 and json.loads(got.stdout)["id"] == job_id
    listed = _cli("list", "--server", stack.base_url, "--status", "succeeded")
    assert job_id in listed.stdout
    dl = _cli("download", job_id, "plan", "-o", str(tmp_path / "out"), "--server", stack.base_url)
    assert dl.returncode == 0, dl.stderr
    assert Path(dl.stdout.strip()).is_file()

    before = len(_cli("list", "--server", stack.base_url, "--limit", "1000").stdout.splitlines())
    early = _cli("submit", str(spec), "--server", stack.base_url, "--download", str(tmp_path / "x"))
    assert early.returncode == 2 and "--wait" in early.stderr  # refused before anything is submitted
    assert len(_cli("list", "--server", stack.base_url, "--limit", "1000").stdout.splitlines()) == before
    again = _cli("download", job_id, "plan", "-o", str(tmp_path / "out"), "--server", stack.base_url)
    assert again.returncode == 2 and "exists" in again.stderr  # never replaced silently
    spec.write_text(json.dumps({**FAST_SPEC, "target_ratio": 3}))
    bad = _cli("submit", str(spec), "--server", stack.base_url)
    assert bad.returncode == 2 and "[target_ratio]" in bad.stderr and "Traceback" not in bad.stderr
    gone = _cli("get", "job_nope", "--server", stack.base_url)
    assert gone.returncode == 2 and "not_found" in gone.stderr
    down = _cli("list", "--server", "http://127.0.0.1:9", "--retries", "0")
    assert down.returncode == 3 and "cannot reach" in down.stderr


def test_metrics_are_scraped_and_parse(stack, client: httpx.Client) -> None:
    """``/metrics`` in the Prometheus text format: job counts agree with the API, histograms and latency are there."""
    client.get("/v1/jobs")
    r = httpx.get(f"{stack.base_url}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    assert families["lorashear_database_up"].samples[0].value == 1.0
    jobs = {s.labels["status"]: s.value for s in families["lorashear_jobs"].samples}
    assert set(jobs) == {"queued", "running", "succeeded", "failed", "cancelled"}
    assert all(v >= 0 for v in jobs.values())
    wait = [s for s in families["lorashear_job_queue_wait_seconds"].samples if s.name.endswith("_count")]
    assert jobs["succeeded"] >= 1 and wait[0].value >= jobs["succeeded"] + jobs["failed"]  # each one started
    run = [s for s in families["lorashear_job_run_seconds"].samples if s.name.endswith("_count")]
    assert {s.labels["status"] for s in run} == {"succeeded", "failed", "cancelled"}
    lat = [
        s
        for s in families["lorashear_http_request_duration_seconds"].samples
        if s.name.endswith("_count") and s.labels["route"] == "/v1/jobs" and s.labels["method"] == "GET"
    ]
    assert lat and lat[0].value >= 1 and lat[0].labels["status"] == "2xx"
    assert not re.search(r"job_[0-9a-f]{8}", r.text) and API_KEY not in r.text  # aggregates only
    assert "lorashear_worker_heartbeat_age_seconds" in families
    httpx.request("FOOBAR", f"{stack.base_url}/v1/jobs", timeout=10)  # any method name: one bounded label
    text = httpx.get(f"{stack.base_url}/metrics", timeout=30).text
    assert "FOOBAR" not in text and 'method="other"' in text


def test_catalog_lists_names_not_paths(stack, client: httpx.Client) -> None:
    models = client.get("/v1/models")
    assert models.status_code == 200, models.text
    names = {e["name"]: e for e in models.json()["data"]}
    assert names["stories260K"]["kind"] == "model" and names["stories260K"]["model_type"] == "llama"
    data = {e["name"] for e in client.get("/v1/data").json()["data"]}
    assert "tinystories/calibration.txt" in data
    assert not any(n.startswith("/") for n in [*names, *data])
    assert httpx.get(f"{stack.base_url}/v1/models", timeout=10).status_code == 401  # API keys apply


def test_docs_work_offline_and_spec_sections_are_typed(stack) -> None:
    page = httpx.get(f"{stack.base_url}/docs", timeout=10)
    assert page.status_code == 200
    assert "cdn" not in page.text.lower() and "https://" not in page.text
    assert '"validatorUrl": null' in page.text  # Swagger UI would otherwise call validator.swagger.io
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        r = httpx.get(f"{stack.base_url}/static/docs/{asset}", timeout=10)
        assert r.status_code == 200 and len(r.content) > 10_000, asset
    spec = httpx.get(f"{stack.base_url}/openapi.json", timeout=10).json()["components"]["schemas"]["JobSpecIn"]
    lora = spec["properties"]["lora"]["anyOf"][0]["properties"]
    assert lora["rank"]["type"] == "integer" and lora["rank"]["minimum"] == 1 and lora["rank"]["default"] == 8
    assert "LoRA rank" in lora["rank"]["description"]
    lhspg = spec["properties"]["lhspg"]["anyOf"][0]["properties"]
    assert lhspg["mode"]["enum"] == ["decay", "hsp"] and lhspg["distill"]["maximum"] == 1
    data = spec["properties"]["data"]["anyOf"][0]["properties"]
    assert data["train"]["items"]["properties"]["validation_fraction"]["exclusiveMaximum"] == 1
