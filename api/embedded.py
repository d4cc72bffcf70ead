"""The embedded default: the same API with SQLite and an in-process worker thread, and a demo that drives it.

``serve()`` needs no settings at all (``lorashear serve``); ``demo()`` starts ``serve`` in a subprocess on a free
port, submits a real pruning job on the bundled model over HTTP, follows its events and prints the finished job
with its metrics (``lorashear demo``). Also runnable as ``python -m api.embedded serve|demo``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEMO_SPEC: dict[str, Any] = {
    "model": "stories260K",
    "target_ratio": 0.2,
    "lhspg": {"warmup_steps": 4, "periods": 2, "period_steps": 6, "batch_size": 4, "seq_len": 64},
    "recovery": {"rounds": 1, "steps_per_round": 8, "batch_size": 4, "seq_len": 64},
    "analysis": {"max_tokens": 2048},
    "evaluation": {"max_windows": 16},
}
"""A small job on the bundled stories260K (a real GQA LLaMA) that finishes in about a minute on a CPU."""


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    var_dir: str | os.PathLike[str] | None = None,
    log_level: str = "info",
) -> None:
    """Serve the API with the embedded defaults until interrupted.

    With no ``DATABASE_URL``/``BROKER_URL`` in the environment: a SQLite file and outputs under ``var_dir``
    (default ``VAR_DIR`` or ``./var``), migrated at startup, and an in-process worker thread. Without
    ``API_KEY_HASHES`` only a loopback ``host`` is accepted.

    Args:
        host: address to bind; a non-loopback address requires API keys.
        port: TCP port.
        var_dir: directory for the database, artifacts and checkpoints.
        log_level: uvicorn log level.

    Raises:
        jobs.settings.SettingsError: unsafe settings (no keys on a public address).
    """
    import logging

    import uvicorn

    from api.app import create_app
    from jobs.settings import Settings

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides: dict[str, Any] = {"bind_host": host}
    if var_dir is not None:
        overrides["var_dir"] = Path(var_dir)
    settings = Settings(**overrides)
    app = create_app(settings)
    base = f"http://{host}:{port}"
    print(
        f"lorashear service on {base}  (dashboard: {base}/ui, docs: {base}/docs, metrics: {base}/metrics)", flush=True
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _render(event: dict[str, Any]) -> str:
    total = f"/{event['total']}" if event.get("total") else ""
    metrics = "  ".join(f"{k}={v:.4g}" for k, v in sorted((event.get("metrics") or {}).items()))
    line = f"[{event['stage']:>8}] {event['kind']:<11} {event['step']}{total}"
    if event.get("message"):
        line += f"  {event['message']}"
    return f"{line}  {metrics}".rstrip()


def demo(
    spec: dict[str, Any] | None = None,
    *,
    var_dir: str | os.PathLike[str] | None = None,
    timeout: float = 3600.0,
    out=None,
) -> int:
    """Run a real job on the embedded service over HTTP and print its progress and result.

    Starts ``serve`` in a subprocess on a free loopback port, waits for ``/readyz``, submits ``spec`` (default
    :data:`DEMO_SPEC`), follows ``GET /v1/jobs/{id}/events`` as Server-Sent Events printing stage and step/total,
    then prints the finished job (summary metrics, artifacts), the last value of each metric series, and the
    zero-shot and speed tables of its ``report.json``.

    Args:
        spec: the job spec; default :data:`DEMO_SPEC`.
        var_dir: where the service keeps its database and outputs (default: a new temporary directory).
        timeout: seconds to wait for the job.
        out: text stream to print to (default stdout).

    Returns:
        0 when the job succeeded, 1 otherwise (a process exit status).
    """
    import httpx

    out = out or sys.stdout
    var = Path(var_dir) if var_dir is not None else Path(tempfile.mkdtemp(prefix="lorashear-demo-"))
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL")}
    env["VAR_DIR"] = str(var)
    log_path = var / "serve.log"
    var.mkdir(parents=True, exist_ok=True)
    print(f"starting the embedded service on {base} (data in {var}, log {log_path})", file=out, flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "api.embedded", "serve", "--port", str(port), "--var-dir", str(var)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent,
        )
    try:
        with httpx.Client(base_url=base, timeout=60.0) as client:
            _wait_ready(client, proc, log_path)
            r = client.post("/v1/jobs", json=spec or DEMO_SPEC)
            if r.status_code != 201:
                print(f"submission rejected ({r.status_code}): {r.text}", file=out)
                return 1
            job = r.json()
            print(f"submitted {job['id']}: {json.dumps(spec or DEMO_SPEC)}", file=out, flush=True)
            deadline = time.monotonic() + timeout
            _follow(client, job["id"], deadline, out)
            job = client.get(f"/v1/jobs/{job['id']}").json()
            metrics = client.get(f"/v1/jobs/{job['id']}/metrics").json()
            report = None
            if job["status"] == "succeeded":  # the zero-shot and speed tables come from report.json
                arts = client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
                url = next((a["download_url"] for a in arts if a["name"] == "report"), None)
                report = client.get(url).json() if url else None
        _print_result(job, metrics, out, report)
        return 0 if job["status"] == "succeeded" else 1
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def _wait_ready(client: Any, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited with status {proc.returncode}; see {log_path}")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the service did not become ready within {timeout:.0f} s; see {log_path}")


def _follow(client: Any, job_id: str, deadline: float, out: Any) -> None:
    """Print events from the SSE stream until ``event: end`` (reconnecting with Last-Event-ID if dropped)."""
    import httpx

    last = 0
    while time.monotonic() < deadline:
        try:
            headers = {"Accept": "text/event-stream", "Last-Event-ID": str(last)}
            with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=None) as r:
                kind = None
                for line in r.iter_lines():
                    if time.monotonic() > deadline:
                        return
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("id: "):
                        last = int(line[4:])
                    elif line.startswith("data: "):
                        data = json.loads(line[6:])
                        if kind == "end":
                            return
                        print(_render(data), file=out, flush=True)
        except httpx.TransportError:
            time.sleep(1.0)


def _print_result(
    job: dict[str, Any], metrics: dict[str, list[dict[str, Any]]], out: Any, report: dict[str, Any] | None = None
) -> None:
    print(f"\njob {job['id']}: {job['status']} (attempt {job['attempt']})", file=out)
    if job.get("error"):
        print(f"error: {json.dumps(job['error'])}", file=out)
    if job.get("summary"):
        print("summary:", file=out)
        for key, value in job["summary"].items():
            print(f"  {key:<20} {value}", file=out)
    if report:
        from lorashear.cli import print_evaluation_tables  # standard library only, no torch

        print_evaluation_tables(report, out)
    if metrics:
        print("metric series (points, last value):", file=out)
        for name, points in sorted(metrics.items()):
            print(f"  {name:<32} {len(points):>4}  {points[-1]['value']:.6g}", file=out)
    for art in job.get("artifacts", []):
        print(f"artifact {art['name']:<12} {art['kind']:<9} {art['size']:>10} B  GET {art['download_url']}", file=out)
    out.flush()


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--port: expected an integer, got {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"--port: expected 1-65535, got {value}")
    return value


def _cmd_serve(args: argparse.Namespace) -> int:
    serve(args.host, args.port, var_dir=args.var_dir)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    spec = json.loads(Path(args.spec).read_text()) if args.spec else None
    return int(demo(spec, var_dir=args.var_dir, timeout=args.timeout) or 0)


def add_commands(sub: Any) -> None:
    """Add ``serve`` and ``demo`` to an argparse sub-parser set (each sets ``func(args) -> exit code``).

    The ``lorashear`` CLI finds this through the ``lorashear.commands`` entry-point group (pyproject.toml), so the
    library never imports the service, and the commands exist only when the service extra is installed.

    Raises:
        ImportError: the service extra is not installed (the CLI then leaves the commands out).
    """
    for dep in ("fastapi", "uvicorn", "sqlalchemy", "httpx"):
        if importlib.util.find_spec(dep) is None:
            raise ImportError(
                f"the service extra is not installed ({dep} is missing): pip install 'lorashear[service]'"
            )
    p_serve = sub.add_parser("serve", help="HTTP API with SQLite and an in-process worker (embedded default)")
    p_serve.add_argument("--host", default="127.0.0.1")
    p_serve.add_argument("--port", type=_port, default=8000)
    p_serve.add_argument("--var-dir", default=None, help="database and outputs (default: $VAR_DIR or ./var)")
    p_serve.set_defaults(func=_cmd_serve)
    p_demo = sub.add_parser("demo", help="start the embedded service, submit a real job over HTTP and follow it")
    p_demo.add_argument("--var-dir", default=None, help="service data (default: a new temporary directory)")
    p_demo.add_argument("--spec", default=None, help="a JSON spec file instead of the built-in demo spec")
    p_demo.add_argument("--timeout", type=float, default=3600.0)
    p_demo.set_defaults(func=_cmd_demo)


def main(argv: list[str] | None = None) -> int:
    """``python -m api.embedded serve|demo``."""
    parser = argparse.ArgumentParser(prog="python -m api.embedded", description=__doc__.split("\n\n")[0])
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
