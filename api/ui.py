"""The web dashboard at ``/ui`` (issue 8): static files shipped in the package (``api/ui/``), no build step, no
CDN. The page holds no data of its own: its script calls the ``/v1`` routes with the API key the user types in,
so the dashboard sees exactly what that key may see."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

UI_DIR = Path(__file__).resolve().parent / "ui"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
"""Content-Security-Policy of the page: only its own script and the same origin (no third-party code can run)."""

router = APIRouter(include_in_schema=False)


@router.get("/ui")
def ui_page() -> FileResponse:
    """The single-page dashboard (job list, job page, submit form; hash routes)."""
    return FileResponse(
        UI_DIR / "index.html",
        media_type="text/html",
        headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
    )


@router.get("/ui/")
def ui_slash() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=307)


def install(app: FastAPI) -> None:
    """Serve the dashboard page and its static files on ``app``."""
    app.mount("/ui/static", StaticFiles(directory=UI_DIR), name="ui-static")
    app.include_router(router)
