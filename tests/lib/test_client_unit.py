"""The client's retry, resume and checksum rules, against scripted HTTP answers (httpx.MockTransport). The same
client against the real stack: tests/service/test_client.py."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import httpx
import pytest

from lorashear import client as lc

JOB = {
    "object": "job",
    "id": "job_1",
    "status": "queued",
    "stage": None,
    "progress": {"step": 0, "total": 0, "fraction": 0.0},
    "spec": {"model": "stories260K"},
    "warnings": [],
    "attempt": 0,
    "cancel_requested": False,
    "created_at": "2026-12-03T08:00:00Z",
    "started_at": None,
    "finished_at": None,
    "error": None,
    "summary": None,
    "artifacts": [],
}


def _client(handler) -> lc.Client:
    return lc.Client("http://svc", api_key="k", backoff=0.0, transport=httpx.MockTransport(handler))


def _error(status: int, code: str, field: str | None = None, **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": "m", "field": field}}, headers=headers)


def test_create_retries_with_the_same_idempotency_key() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) == 1:
            raise httpx.ConnectError("refused")
        if len(seen) == 2:
            return _error(503, "database_unavailable", **{"Retry-After": "0"})
        if len(seen) == 3:
            return _error(429, "too_many_requests", **{"Retry-After": "0"})
        return httpx.Response(201, json=JOB)

    job = _client(handler).create({"model": "stories260K"})
    assert job.id == "job_1" and job.status == "queued" and job.created_at is not None
    keys = {r.headers["Idempotency-Key"] for r in seen}
    assert len(seen) == 4 and len(keys) == 1  # one key across the retries: the server dedupes
    assert seen[0].headers["Authorization"] == "Bearer k"
    assert json.loads(seen[-1].content) == {"model": "stories260K"}
    other = _client(handler).create({"model": "stories260K"})  # a new call: a new key
    assert other.id == "job_1" and seen[-1].headers["Idempotency-Key"] not in keys


def test_errors_map_to_one_class_per_code() -> None:
    answers = {
        "/v1/jobs/a": _error(422, "config_error", "lora.rank"),
        "/v1/jobs/b": _error(404, "not_found"),
        "/v1/jobs/c": _error(409, "job_finished"),
        "/v1/jobs/d": _error(418, "teapot"),
        "/v1/jobs/e": httpx.Response(502, text="bad gateway"),
    }
    c = lc.Client("http://svc", retries=0, transport=httpx.MockTransport(lambda r: answers[r.url.path]))
    with pytest.raises(lc.ConfigError) as e:
        c.get("a")
    assert isinstance(e.value, lc.InvalidRequest) and e.value.field == "lora.rank" and e.value.status == 422
    with pytest.raises(lc.NotFound):
        c.get("b")
    with pytest.raises(lc.JobFinished) as f:
        c.get("c")
    assert isinstance(f.value, lc.Conflict)
    with pytest.raises(lc.APIError) as t:
        c.get("d")
    assert t.value.code == "teapot" and type(t.value) is lc.APIError
    with pytest.raises(lc.APIError) as g:
        c.get("e")
    assert g.value.status == 502
    for bad in ("", "..", "a/b", "x?y", "%2e"):
        with pytest.raises(ValueError):
            c.get(bad)
    assert set(lc.ERROR_TYPES) >= {"config_error", "invalid_spec", "unauthorized", "database_unavailable"}


def test_connection_failure_after_retries() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        raise httpx.ConnectError("refused")

    with pytest.raises(lc.ConnectionFailed):
        lc.Client("http://svc", retries=2, backoff=0.0, transport=httpx.MockTransport(handler)).get("job_1")
    assert len(calls) == 3


def _event(i: int, stage: str = "prune") -> dict:
    return {
        "object": "event",
        "id": i,
        "attempt": 1,
        "stage": stage,
        "kind": "progress",
        "step": i,
        "total": 9,
        "message": "",
        "metrics": {"lhspg/loss": 1.0 / i},
        "data": {},
        "time": "2026-12-03T08:00:00Z",
    }


SSE = {"Content-Type": "text/event-stream"}


def _frames(ids: list[int], end: bool) -> bytes:
    out = "retry: 2000\n\n: keepalive\n\n"
    for i in ids:
        out += f"id: {i}\nevent: progress\ndata: {json.dumps(_event(i))}\n\n"
    if end:
        out += 'event: end\ndata: {"status": "succeeded"}\n\n'
    return out.encode()


def test_events_resume_with_last_event_id_after_a_dropped_stream() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) == 1:  # the connection drops after three events, without "end"
            return httpx.Response(
                200, content=_frames([1, 2, 3], end=False), headers={"Content-Type": "text/event-stream"}
            )
        if len(seen) == 2:
            raise httpx.ReadError("reset")
        return httpx.Response(200, content=_frames([4, 5], end=True), headers=SSE)

    events = list(_client(handler).events("job_1"))
    assert [e.id for e in events] == [1, 2, 3, 4, 5]
    assert events[0].metrics == {"lhspg/loss": 1.0} and events[0].stage == "prune"
    assert "Last-Event-ID" not in seen[0].headers
    assert seen[2].headers["Last-Event-ID"] == "3" and seen[2].url.params["after"] == "3"
    assert all(r.headers["Accept"] == "text/event-stream" for r in seen)


def _tar(files: dict[str, bytes], prefix: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{prefix}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _artifact(files: dict[str, bytes], tamper: bytes | None = None) -> tuple[dict, bytes]:
    manifest = [{"path": p, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for p, d in sorted(files.items())]
    digest = hashlib.sha256("".join(f"{f['sha256']}  {f['path']}\n" for f in manifest).encode()).hexdigest()
    art = {
        "object": "artifact",
        "id": "art_1",
        "job_id": "job_1",
        "name": "model",
        "kind": "directory",
        "size": sum(len(d) for d in files.values()),
        "sha256": digest,
        "files": manifest,
        "created_at": "2026-12-03T08:00:00Z",
        "download_url": "/v1/jobs/job_1/artifacts/art_1/content",
    }
    served = dict(files)
    if tamper is not None:
        served["config.json"] = tamper
    served["../escape.txt"] = b"not in the manifest"
    return art, _tar(served, "model")


@pytest.mark.parametrize("tampered", [False, True])
def test_download_checks_every_digest_and_leaves_nothing_on_failure(tmp_path: Path, tampered: bool) -> None:
    files = {"config.json": b'{"a": 1}', "sub/model.safetensors": b"\x00" * 1000}
    art, body = _artifact(files, tamper=b'{"a": 2}' if tampered else None)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/artifacts"):
            return httpx.Response(200, json={"object": "list", "data": [art]})
        return httpx.Response(200, content=body, headers={"Content-Type": "application/x-tar"})

    c = _client(handler)
    if tampered:
        with pytest.raises(lc.ChecksumMismatch):
            c.download("job_1", "model", tmp_path)
        assert list(tmp_path.iterdir()) == []
        return
    out = c.download("job_1", "model", tmp_path)
    assert out == tmp_path / "model"
    assert (out / "config.json").read_bytes() == files["config.json"]
    assert (out / "sub" / "model.safetensors").read_bytes() == files["sub/model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing outside, no temporary left
    with pytest.raises(lc.NotFound):
        c.download("job_1", "adapter", tmp_path)


def test_sse_parser_follows_the_event_stream_format() -> None:
    lines = [
        "retry: 10",
        "",
        ": comment",
        "id: 7",
        "event: progress",
        "data: a",
        "data:b",
        "",
        "event: end",
        "data: x",
        "",
    ]
    assert list(lc._sse(iter(lines))) == [("progress", "a\nb", 7), ("end", "x", None)]


def test_download_refuses_to_replace_unless_asked(tmp_path: Path) -> None:
    files = {"config.json": b'{"a": 1}'}
    art, body = _artifact(files)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/artifacts"):
            return httpx.Response(200, json={"object": "list", "data": [art]})
        return httpx.Response(200, content=body, headers={"Content-Type": "application/x-tar"})

    c = _client(handler)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "my_notes.txt").write_text("precious")
    with pytest.raises(lc.DestinationExists):
        c.download("job_1", "model", tmp_path)
    assert (tmp_path / "model" / "my_notes.txt").read_text() == "precious"
    out = c.download("job_1", "model", tmp_path, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(lc.InvalidInput):
        c.download("job_1", "model", tmp_path / "afile")


def test_bad_arguments_raise_invalid_input_before_any_request(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:  # pragma: no cover - nothing may be sent
        raise AssertionError(f"sent {request.method} {request.url}")

    for url in ("127.0.0.1:8000", "ftp://host", "http://"):
        with pytest.raises(lc.InvalidInput):
            lc.Client(url, transport=httpx.MockTransport(handler))
    for key in ("clé", "a\nb", "two words"):
        with pytest.raises(lc.InvalidInput):
            lc.Client("http://svc", api_key=key, transport=httpx.MockTransport(handler))
    c = _client(handler)
    for bad in ("\n", "x" * 1000, "ünï", "a b"):
        with pytest.raises(lc.InvalidInput):
            c.get(bad)
    for spec in ([1, 2], 3, {"model": "m", "target_ratio": float("nan")}, "{not json"):
        with pytest.raises(lc.InvalidInput):
            c.create(spec)  # type: ignore[arg-type]
    bad_yaml = tmp_path / "spec.yaml"
    bad_yaml.write_text("model: [unclosed\n")
    with pytest.raises(lc.InvalidInput, match="YAML"):
        c.create(bad_yaml)
    with pytest.raises(lc.InvalidInput, match="No such file"):
        c.create(tmp_path / "missing.json")
    assert issubclass(lc.InvalidInput, lc.ClientError)


def test_create_accepts_json_text() -> None:
    sent: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.content)
        return httpx.Response(201, json=JOB)

    _client(handler).create('{"model": "stories260K"}')
    assert json.loads(sent[0]) == {"model": "stories260K"}


def test_wait_times_out_while_no_event_arrives() -> None:
    import time

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):  # only keepalives: a job queued behind others
            return httpx.Response(200, content=b": keepalive\n\n" * 3, headers=SSE)
        return httpx.Response(200, json=JOB)

    c = lc.Client("http://svc", backoff=0.05, retries=1000, transport=httpx.MockTransport(handler))
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="still queued"):
        c.wait("job_1", progress=False, timeout=0.5)
    assert time.monotonic() - t0 < 5


def test_catalog_lists_only_names_a_spec_can_use(tmp_path: Path) -> None:
    from lorashear.resolve import Roots

    models, data = tmp_path / "models", tmp_path / "data"
    for name, cfg in (("good", '{"model_type": "llama"}'), ("has space", '{"model_type": "llama"}'), ("broken", "{")):
        (models / name).mkdir(parents=True)
        (models / name / "config.json").write_text(cfg)
    (models / "loop").symlink_to(models / "loop")
    (models / "out").symlink_to("/etc")
    (models / "m.gguf").write_bytes(b"GGUF")
    data.mkdir()
    for name in ("ok.txt", "sp ace.txt", "new\nline.txt", ".hidden.txt"):
        (data / name).write_text("text")
    (data / "empty.txt").write_text("")
    roots = Roots(models, data)
    assert [(e.name, e.kind) for e in roots.list_models()] == [("good", "model"), ("m.gguf", "gguf")]
    assert [e.name for e in roots.list_data()] == ["ok.txt"]
    with pytest.raises(Exception) as err:
        roots.model("loop")
    assert str(tmp_path) not in str(err.value)  # no server path in the message
