"""A real job through the real stack: HTTP -> PostgreSQL -> Redis -> Celery worker -> pipeline -> artifacts."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import httpx
import pytest

from .helpers import FAST_SPEC, wait_terminal

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def finished(stack) -> dict:
    """One fast job on stories260K, submitted over HTTP and run by the Celery worker to the end."""
    from .helpers import API_KEY

    with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        r = c.post("/v1/jobs", json=FAST_SPEC)
        assert r.status_code == 201, r.text
        assert r.headers["Location"] == f"/v1/jobs/{r.json()['id']}"
        job = wait_terminal(c, r.json()["id"], timeout=600)
    assert job["status"] == "succeeded", f"{job}\n--- worker log ---\n{stack.log('worker1')}"
    return job


def test_job_succeeds_with_summary_metrics(finished: dict) -> None:
    s = finished["summary"]
    for key in (
        "params_before",
        "params_after",
        "params_target",
        "compression_ratio",
        "ppl_dense",
        "ppl_pruned",
        "ppl_recovered",
        "max_abs_logit_diff",
    ):
        assert isinstance(s[key], (int, float)), key
    assert s["params_after"] < s["params_before"]
    assert abs(s["compression_ratio"] - 0.2) < 0.02
    # zero-shot (lm-eval) and measured speed, dense vs final, by default (issue 6)
    assert 0 <= s["zeroshot_avg_dense"] <= 1 and 0 <= s["zeroshot_avg_final"] <= 1
    assert s["decode_speedup_b1"] > 0 and s["ideal_speedup_flops"] > 1
    assert finished["attempt"] == 1 and finished["error"] is None
    assert finished["progress"]["fraction"] == 1.0 and finished["stage"] == "export"
    assert finished["started_at"] and finished["finished_at"] >= finished["started_at"]
    assert finished["spec"]["lhspg"]["period_steps"] == 3  # canonical spec with defaults filled in
    assert finished["spec"]["lora"]["rank"] == 8


def test_metrics_are_named_series(client, finished: dict) -> None:
    series = client.get(f"/v1/jobs/{finished['id']}/metrics").json()
    loss = series["lhspg/loss"]
    assert len(loss) == FAST_SPEC["lhspg"]["warmup_steps"] + 2 * FAST_SPEC["lhspg"]["period_steps"]
    assert [p["step"] for p in loss] == sorted(p["step"] for p in loss)
    assert all(set(p) == {"step", "value", "time"} for p in loss)
    only = client.get(f"/v1/jobs/{finished['id']}/metrics", params={"name": "lhspg/loss"}).json()
    assert list(only) == ["lhspg/loss"]


def test_events_paged_and_streamed(client, stack, finished: dict) -> None:
    job_id = finished["id"]
    first = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 5}).json()
    assert len(first["data"]) == 5 and first["has_more"]
    rest, after = [], first["next_cursor"]
    while after:
        page = client.get(f"/v1/jobs/{job_id}/events", params={"after": after, "limit": 50}).json()
        rest += page["data"]
        after = page["next_cursor"] if page["has_more"] else None
    events = first["data"] + rest
    ids = [e["id"] for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    stages = [e["stage"] for e in events if e["kind"] == "stage_start"]
    assert stages == ["load", "discover", "analyze", "prune", "compress", "recover", "evaluate", "export"]
    # issue 7, item 10: no event names a server path (the temporary tree holds the roots, artifacts and work dirs)
    server_paths = [str(stack.tmp), str(stack.tmp.resolve()), "/work/", "site-packages"]
    leaks = [e for e in events for p in server_paths if p in json.dumps(e)]
    assert not leaks, leaks[:3]

    # The same events as Server-Sent Events, twice: by Accept header and by ?stream=true.
    for kwargs in ({"headers": {"Accept": "text/event-stream"}}, {"params": {"stream": "true"}}):
        with client.stream("GET", f"/v1/jobs/{job_id}/events", **kwargs) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            streamed, kinds = [], []
            for line in r.iter_lines():
                if line.startswith("event: "):
                    kinds.append(line[7:])
                elif line.startswith("data: ") and kinds[-1] != "end":
                    streamed.append(json.loads(line[6:])["id"])
                elif line.startswith("data: "):
                    assert json.loads(line[6:])["status"] == "succeeded"
        assert streamed == ids and kinds[-1] == "end"
    # Last-Event-ID resumes after that event.
    with client.stream("GET", f"/v1/jobs/{job_id}/events?stream=true", headers={"Last-Event-ID": str(ids[-3])}) as r:
        tail = [json.loads(line[6:])["id"] for line in r.iter_lines() if line.startswith('data: {"object"')]
    assert tail == ids[-2:]


def test_artifacts_download_and_load(client, finished: dict, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    listed = client.get(f"/v1/jobs/{finished['id']}/artifacts").json()["data"]
    by_name = {a["name"]: a for a in listed}
    assert {"model", "plan", "report"} <= set(by_name)
    assert by_name["model"]["kind"] == "directory" and by_name["plan"]["kind"] == "file"
    assert [a["id"] for a in finished["artifacts"]] == [a["id"] for a in listed]

    # A file artifact: bytes match the recorded size and digest.
    report = client.get(by_name["report"]["download_url"])
    assert report.status_code == 200
    assert len(report.content) == by_name["report"]["size"]
    assert hashlib.sha256(report.content).hexdigest() == by_name["report"]["sha256"]
    assert json.loads(report.content)["summary"]["params_after"] == finished["summary"]["params_after"]

    # The model directory as a tar: every manifest entry, each with its digest; it loads with from_pretrained.
    model = by_name["model"]
    r = client.get(model["download_url"])
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
    assert int(r.headers["content-length"]) == len(r.content)
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        names = tar.getnames()
        assert sorted(names) == sorted(f"model/{f['path']}" for f in model["files"])
        for f in model["files"]:
            data = tar.extractfile(f"model/{f['path']}").read()
            assert hashlib.sha256(data).hexdigest() == f["sha256"]
        tar.extractall(tmp_path, filter="data")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert sum(p.numel() for p in loaded.parameters()) == finished["summary"]["params_after"]
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    out = loaded.generate(**tok("Once upon a time", return_tensors="pt"), max_new_tokens=8, do_sample=False)
    assert out.shape[1] > 4

    # One file of the directory with ?path=, and traversal attempts are refused.
    cfg = client.get(model["download_url"], params={"path": "config.json"})
    assert cfg.status_code == 200 and json.loads(cfg.content)["num_hidden_layers"] == 5
    for bad in ("../plan.json", "../../../../etc/passwd", "/etc/passwd", "sub/../../report.json"):
        r = client.get(model["download_url"], params={"path": bad})
        assert r.status_code == 404, bad
        assert r.json()["error"]["code"] == "not_found"
