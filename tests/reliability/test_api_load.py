"""Item 1, 10, 11 of issue 7: a burst of 200 concurrent submissions (PostgreSQL and the embedded SQLite default)
answers no 5xx; request limits (unknown fields, body size, media type, UTF-8, Idempotency-Key in the schema)."""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from service.helpers import API_KEY, FAST_SPEC
from sqlalchemy import create_engine, text

from .conftest import record, stack_env

pytestmark = pytest.mark.service

N_POSTS = 200
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _burst(base_url: str, n: int = N_POSTS) -> tuple[Counter, list[str], list[httpx.Response]]:
    """``n`` POSTs at once, each with its own Idempotency-Key; returns status counts, job ids and odd answers."""
    barrier_spec = {**FAST_SPEC, "runtime": {"threads": 1}}

    def one(i: int) -> httpx.Response | Exception:
        try:
            with httpx.Client(base_url=base_url, headers=AUTH, timeout=300) as c:
                return c.post("/v1/jobs", json={**barrier_spec, "seed": i}, headers={"Idempotency-Key": f"burst-{i}"})
        except httpx.HTTPError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=n) as pool:
        answers = list(pool.map(one, range(n)))
    codes: Counter = Counter()
    ids, odd = [], []
    for a in answers:
        if isinstance(a, Exception):
            codes[f"transport:{type(a).__name__}"] += 1
            continue
        codes[a.status_code] += 1
        if a.status_code == 201:
            ids.append(a.json()["id"])
        elif a.status_code in (429, 503):
            assert a.headers.get("Retry-After"), a.text
            assert set(a.json()["error"]) == {"code", "message", "field"}
        else:
            odd.append(a)
    return codes, ids, odd


def test_200_concurrent_posts_postgres(make_stack, pg_url, tmp_path) -> None:
    stack = make_stack(
        stack_env(
            tmp_path, database_url=pg_url, broker_url=os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
        ),
        worker=False,
    )
    codes, ids, odd = _burst(stack.base_url)
    record(
        "concurrent_posts_postgres",
        {
            "posts": N_POSTS,
            "codes": dict(codes),
            "5xx": sum(v for k, v in codes.items() if isinstance(k, int) and k >= 500),
        },
    )
    assert not odd, [(r.status_code, r.text[:300]) for r in odd]
    assert not any(isinstance(k, int) and k >= 500 for k in codes), codes
    assert codes[201] + codes[429] == N_POSTS, codes
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        n = conn.execute(text("SELECT count(*) FROM jobs WHERE idempotency_key LIKE 'burst-%'")).scalar_one()
    engine.dispose()
    assert n == len(ids) == len(set(ids))


def test_200_concurrent_posts_embedded(make_stack, tmp_path) -> None:
    env = stack_env(tmp_path, database_url="", broker_url="")
    env.pop("DATABASE_URL")
    env.pop("BROKER_URL")
    stack = make_stack(env, worker=False)  # the embedded worker thread runs inside the API process
    codes, ids, odd = _burst(stack.base_url)
    record(
        "concurrent_posts_embedded_sqlite",
        {
            "posts": N_POSTS,
            "codes": dict(codes),
            "5xx": sum(v for k, v in codes.items() if isinstance(k, int) and k >= 500),
        },
    )
    with httpx.Client(base_url=stack.base_url, headers=AUTH, timeout=120) as c:
        for job_id in ids:  # stop the backlog: queued jobs are cancelled at once
            assert c.post(f"/v1/jobs/{job_id}/cancel").status_code in (200, 409)
    assert not odd, [(r.status_code, r.text[:300]) for r in odd]
    assert not any(isinstance(k, int) and k >= 500 for k in codes), codes
    assert codes[201] + codes[429] == N_POSTS, codes


def test_request_limits(make_stack, pg_url, tmp_path) -> None:
    stack = make_stack(
        stack_env(
            tmp_path,
            database_url=pg_url,
            broker_url=os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/13"),
            MAX_BODY_BYTES="1048576",
        ),
        worker=False,
    )
    seen = {}
    with httpx.Client(base_url=stack.base_url, headers=AUTH, timeout=120) as c:
        # A typo is refused, naming the field; the opt-out accepts it with a warning.
        r = c.post("/v1/jobs", json={**FAST_SPEC, "lora": {"rnk": 4}})
        seen["typo"] = r.status_code
        assert r.status_code == 422, r.text
        assert r.json()["error"]["field"] == "lora.rnk" and r.json()["error"]["code"] == "config_error"
        assert "lora.rnk" in r.json()["error"]["message"]
        r = c.post("/v1/jobs?allow_unknown_fields=true", json={**FAST_SPEC, "lora": {"rnk": 4}})
        assert r.status_code == 201 and any("lora.rnk" in w for w in r.json()["warnings"])
        c.post(f"/v1/jobs/{r.json()['id']}/cancel")
        # Bodies over the limit: 413, declared or streamed; nothing echoed.
        big = b'{"model": "stories260K", "data": {"train": [' + b'"x",' * 6_000_000 + b'"x"]}}'  # 24 MB
        r = c.post("/v1/jobs", content=big, headers={"Content-Type": "application/json"})
        seen["24MB"] = r.status_code
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large" and len(r.content) < 1000

        def chunks():
            yield b'{"model": "stories260K", "seed": 1, "x": "'
            for _ in range(40):
                yield b"y" * 65536
            yield b'"}'

        r = c.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
        seen["chunked-2.5MB"] = r.status_code
        assert r.status_code == 413
        # A value under the limit but huge in an error message: the message is capped.
        r = c.post("/v1/jobs", json={**FAST_SPEC, "target_ratio": ["0.2"] * 100_000})
        seen["huge-value"] = (r.status_code, len(r.content))
        assert r.status_code == 422 and len(r.content) < 2000, len(r.content)
        # Media type and encoding.
        r = c.post("/v1/jobs", content=b'{"model": "stories260K"}', headers={"Content-Type": "text/plain"})
        seen["text/plain"] = r.status_code
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
        r = c.post("/v1/jobs", content=b'{"model": "stories\xff\xfe"}', headers={"Content-Type": "application/json"})
        seen["non-utf8"] = r.status_code
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_json", r.text
        # Idempotency-Key: over 255 characters refused, and the schema says so.
        r = c.post("/v1/jobs", json=FAST_SPEC, headers={"Idempotency-Key": "k" * 256})
        seen["key-256"] = r.status_code
        assert r.status_code == 422 and r.json()["error"]["field"] == "Idempotency-Key"
        params = c.get("/openapi.json").json()["paths"]["/v1/jobs"]["post"]["parameters"]
        key = next(p for p in params if p["name"] == "Idempotency-Key")
        schema = key["schema"].get("anyOf", [key["schema"]])[0]
        assert schema["maxLength"] == 255 and schema["minLength"] == 1
    record("request_limits", seen)
