"""``lorashear jobs ...``: the job service from the command line, on top of :mod:`lorashear.client` (issue 8).

Examples::

    lorashear jobs submit examples/stories260k-20.json --server http://127.0.0.1:8000 --wait --download out/
    lorashear jobs list --status running
    lorashear jobs get JOB_ID
    lorashear jobs watch JOB_ID          # a live progress bar per stage until the job ends
    lorashear jobs cancel JOB_ID
    lorashear jobs download JOB_ID model -o out/

The server comes from ``--server`` or ``$LORASHEAR_SERVER`` (default http://127.0.0.1:8000), the API key from
``--api-key`` or ``$LORASHEAR_API_KEY``. Exit codes: 0 done, 1 the job failed or the service erred, 2 bad input
(an invalid spec, an unknown job), 3 the service could not be reached, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any


def _client(args: argparse.Namespace) -> Any:
    from lorashear.client import Client

    return Client(args.server, args.api_key, retries=args.retries)


def _print_job(job: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(job.raw, indent=1))
        return
    line = f"{job.id}  {job.status:<9}"
    if job.status in ("queued", "running"):
        line += f"  {job.stage or '-':<9} {100 * job.progress.fraction:5.1f}%"
    if job.summary:
        s = job.summary
        parts = [f"removed {s['compression_ratio']:.1%}" if "compression_ratio" in s else ""]
        if s.get("ppl_recovered") is not None:
            parts.append(f"ppl {s.get('ppl_dense', float('nan')):.2f} -> {s['ppl_recovered']:.2f}")
        line += "  " + ", ".join(p for p in parts if p)
    if job.error:
        line += f"  {job.error.code}: {job.error.message}"
    print(line)


def cmd_submit(args: argparse.Namespace) -> int:
    if args.download and not args.wait:  # refuse before anything is submitted
        print("error: --download needs --wait", file=sys.stderr)
        return 2
    with _client(args) as c:
        job = c.create(args.spec, idempotency_key=args.idempotency_key, allow_unknown_fields=args.allow_unknown_fields)
        for w in job.warnings:
            print(f"warning: {w}", file=sys.stderr)
        if not args.wait:
            print(job.id if not args.json else json.dumps(job.raw, indent=1))
            return 0
        print(f"submitted {job.id}", file=sys.stderr)
        job = c.wait(job.id, progress=not args.quiet, raise_on_failure=False)
        _print_job(job, args.json)
        if job.status != "succeeded":
            return 1
        if args.download:
            for name in ("model", "report", "plots", "gguf"):
                if any(a.name == name for a in job.artifacts):
                    print(c.download(job.id, name, args.download, overwrite=args.overwrite), file=sys.stderr)
        return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        for n, job in enumerate(c.list(args.status)):
            if n >= args.limit:
                break
            _print_job(job, args.json)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print_job(c.get(args.job_id), args.json)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    with _client(args) as c:
        job = c.wait(args.job_id, progress=True, raise_on_failure=False)
        _print_job(job, args.json)
        return 0 if job.status == "succeeded" else 1


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print_job(c.cancel(args.job_id), args.json)
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    with _client(args) as c:
        path = c.download(args.job_id, args.artifact, args.output, overwrite=args.overwrite)
    print(path)
    return 0


def add_commands(sub: Any) -> None:
    """Add ``jobs`` with its sub-commands to the ``lorashear`` parser's sub-parser set."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", default=None, help="service URL (default $LORASHEAR_SERVER or 127.0.0.1:8000)")
    common.add_argument("--api-key", default=None, help="API key (default $LORASHEAR_API_KEY)")
    common.add_argument("--retries", type=int, default=5, help="retries on connection errors and 429/503 answers")
    common.add_argument("--json", action="store_true", help="print jobs as JSON")

    j = sub.add_parser("jobs", help="submit, follow and download jobs of a LoRAShear service (HTTP client)")
    jsub = j.add_subparsers(dest="jobs_command", required=True)

    s = jsub.add_parser("submit", parents=[common], help="submit a job spec (JSON or YAML file)")
    s.add_argument("spec", help="job spec file")
    s.add_argument("--wait", action="store_true", help="follow the job with progress bars until it ends")
    s.add_argument("--quiet", "-q", action="store_true", help="with --wait: no progress bars")
    s.add_argument(
        "--download", metavar="DIR", default=None, help="with --wait: then download model, report, plots (and gguf)"
    )
    s.add_argument("--overwrite", action="store_true", help="with --download: replace existing files")
    s.add_argument("--idempotency-key", default=None, help="reuse to make a resubmission return the same job")
    s.add_argument("--allow-unknown-fields", action="store_true", help="warn about unknown spec fields")
    s.set_defaults(func=guarded(cmd_submit))

    ls = jsub.add_parser("list", parents=[common], help="your jobs, newest first")
    ls.add_argument("--status", choices=("queued", "running", "succeeded", "failed", "cancelled"))
    ls.add_argument("--limit", type=int, default=50, help="at most this many jobs")
    ls.set_defaults(func=guarded(cmd_list))

    g = jsub.add_parser("get", parents=[common], help="one job")
    g.add_argument("job_id")
    g.set_defaults(func=guarded(cmd_get))

    w = jsub.add_parser("watch", parents=[common], help="live progress bars until the job ends")
    w.add_argument("job_id")
    w.set_defaults(func=guarded(cmd_watch))

    c = jsub.add_parser("cancel", parents=[common], help="cancel a job")
    c.add_argument("job_id")
    c.set_defaults(func=guarded(cmd_cancel))

    d = jsub.add_parser("download", parents=[common], help="download an artifact, checking its SHA-256")
    d.add_argument("job_id")
    d.add_argument("artifact", nargs="?", default="model", help="model, plan, report, adapter, ... (default model)")
    d.add_argument("--output", "-o", default=".", help="directory to write into (default: here)")
    d.add_argument("--overwrite", action="store_true", help="replace an existing file or directory of that name")
    d.set_defaults(func=guarded(cmd_download))


def guarded(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``command`` with client errors turned into one line on stderr and an exit code (see the module docstring)."""

    def run(args: argparse.Namespace) -> int:
        return _run(command, args)

    return run


def _run(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    from lorashear.client import (
        APIError,
        ChecksumMismatch,
        ConnectionFailed,
        DestinationExists,
        InvalidInput,
        JobFailed,
    )

    try:
        return int(command(args))
    except APIError as exc:
        where = f" [{exc.field}]" if exc.field else ""
        print(f"error{where}: {exc.code}: {exc.message}", file=sys.stderr)
        return 2 if 400 <= exc.status < 500 and exc.status != 429 else 1
    except ConnectionFailed as exc:
        print(f"error: cannot reach the service: {exc}", file=sys.stderr)
        return 3
    except (InvalidInput, DestinationExists) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (JobFailed, ChecksumMismatch) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except TimeoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:  # unreadable spec file, bad id
        print(f"error: {exc}", file=sys.stderr)
        return 2
