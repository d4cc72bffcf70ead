"""The dashboard (``/ui``) in a real headless Chromium (Debian's package, driven by Playwright; nothing is
downloaded) against the real stack: pages load without console errors, the submit form shows validation errors
beside the field, a running job's progress moves live, and the finished job page shows the heatmap, the curves
and the tables. Screenshots are kept in ``$TEST_ARTIFACTS/ui`` (default ``test-artifacts/ui``)."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import ROOT
from .helpers import API_KEY, slow_spec

pytestmark = pytest.mark.service

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", ROOT / "test-artifacts")) / "ui"
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists() or shutil.which(CHROMIUM) is None:
        if os.environ.get("LORASHEAR_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} is missing (install Debian's chromium package)")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, stack):
    ctx = browser.new_context(viewport={"width": 1300, "height": 1100}, base_url=stack.base_url)
    p = ctx.new_page()
    p.console_errors = []  # type: ignore[attr-defined]
    p.on("console", lambda m: m.type == "error" and p.console_errors.append(m.text))
    p.on("pageerror", lambda e: p.console_errors.append(str(e)))
    p.set_default_timeout(30_000)
    yield p
    ctx.close()


def _colors(png: bytes) -> tuple[int, set[tuple[int, int, int]]]:
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    px = list(img.getdata())
    return len(px), set(px)


def until(what: str, predicate, timeout: float = 60.0) -> None:
    """Poll ``predicate()`` (Python, reading the page through Playwright's own world: the page's CSP forbids
    evaluating strings in it) until it is true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _text(page, selector: str) -> str:
    loc = page.locator(selector)
    return (loc.text_content() or "") if loc.count() else ""


def _progress(page, stage: str) -> float:
    value = page.get_attribute(f"#stage-{stage}", "value")
    return float(value or 0)


def _login(page) -> None:
    page.goto("/ui")
    page.fill("#api-key", API_KEY)
    page.click("#key-form button")


def test_dashboard_submit_watch_and_inspect_a_job(page) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    _login(page)
    page.wait_for_selector("#jobs")

    # the form: the service's validation error appears beside the field it names
    page.goto("/ui#/new")
    page.wait_for_selector("#submit-form")
    page.fill("#f-target_ratio", "3")
    page.click("#submit")
    until("the target_ratio error", lambda: "target_ratio" in _text(page, "#err-target_ratio"))
    page.fill("#f-target_ratio", "0.2")
    page.fill("#f-extra", json.dumps({"lora": {"rank": -1}}))
    page.click("#submit")
    until("the lora.rank error", lambda: "lora.rank" in _text(page, "#err-extra"))
    page.fill("#f-extra", "{not json")
    page.click("#submit")
    until("the JSON error", lambda: "JSON" in _text(page, "#err-extra"))
    page.screenshot(path=str(ARTIFACTS / "submit-form-errors.png"), full_page=True)

    # a job long enough to watch: submitted through the form, followed live over SSE
    spec = slow_spec(period_steps=25)
    extra = {k: v for k, v in spec.items() if k not in ("model", "target_ratio")}
    page.fill("#f-extra", json.dumps(extra))
    page.click("#submit")
    page.wait_for_url("**/ui#/jobs/*")
    job_id = page.url.rsplit("/", 1)[1]
    until("LHSPG progress", lambda: _progress(page, "prune") > 0, 300)
    first = _progress(page, "prune")
    until("LHSPG progress to move", lambda: _progress(page, "prune") > first, 120)
    page.wait_for_selector("#heatmap rect.cell")  # the sensitivity map arrives with the analyze stage
    page.screenshot(path=str(ARTIFACTS / "job-running.png"), full_page=True)

    until("the job to succeed", lambda: _text(page, "#job-status") == "succeeded", 600)
    page.wait_for_selector("#zeroshot")
    assert "paired standard error" in page.text_content("#zeroshot-paired")
    page.wait_for_selector("#speed")
    assert page.locator("#heatmap rect.cell").count() == 2 * 5  # attention and MLP of stories260K's 5 layers
    assert page.locator("#losses path.series").count() == 2  # LHSPG and recovery
    assert page.locator("#weights path.series").count() >= 2  # one per sub-dataset
    assert page.locator("#widths path.series").count() == 3
    assert page.locator("button.download").count() >= 3
    assert "→" in page.text_content("#ppl") or page.locator("#ppl td").count() == 5
    shot = page.screenshot(path=str(ARTIFACTS / "job-page.png"), full_page=True)
    assert len(shot) > 50_000

    # the screenshot shows the heatmap and the curves: many colours in the map, the series colours in the plots
    n, heat = _colors(page.locator("#heatmap").screenshot(path=str(ARTIFACTS / "heatmap.png")))
    assert len(heat) > 20, "the heatmap is blank"
    _, curves = _colors(page.locator("#losses").screenshot(path=str(ARTIFACTS / "losses.png")))
    near = lambda c, ref: sum(abs(a - b) for a, b in zip(c, ref, strict=True)) < 60  # noqa: E731
    assert any(near(c, (59, 91, 219)) for c in curves), "no LHSPG curve in the screenshot"
    assert any(near(c, (232, 89, 12)) for c in curves), "no recovery curve in the screenshot"

    # the list shows it; the status filter works
    page.goto("/ui#/?status=succeeded")
    page.wait_for_selector(f"tr[data-job='{job_id}']")
    page.goto("/ui#/?status=failed")
    page.wait_for_selector("#jobs")
    time.sleep(0.5)
    assert page.locator(f"tr[data-job='{job_id}']").count() == 0
    assert _unexpected(page.console_errors) == [], page.console_errors


def _unexpected(errors: list[str]) -> list[str]:
    """Console errors other than the browser's own log of the refusals this test provokes on purpose (401 before
    the key is entered, 422 for the invalid submissions)."""
    expected = ("status of 401 (Unauthorized)", "status of 422 (Unprocessable Entity)")
    return [e for e in errors if not (e.startswith("Failed to load resource") and e.endswith(expected))]


def test_dashboard_respects_api_keys(page) -> None:
    page.goto("/ui")
    page.wait_for_selector("[role=alert]")
    assert "unauthorized" in page.text_content("#view")
    page.fill("#api-key", "not-a-key")
    page.click("#key-form button")
    until("the refusal", lambda: "unknown API key" in _text(page, "#view"))
    r = page.request.get("/ui")
    assert r.status == 200 and "script-src 'self'" in r.headers["content-security-policy"]
    assert page.request.get("/ui/static/app.js").status == 200
    assert _unexpected(page.console_errors) == [], page.console_errors
