"""Job states and the transitions between them.

::

    queued ──claim──▶ running ──▶ succeeded | failed | cancelled
      │  ▲               │
      │  └──worker lost──┘   (re-queued by the reconciler; the next claim resumes from the checkpoint)
      └──cancel──▶ cancelled

The database enforces transitions with conditional updates (``WHERE status = ...``); this module names them.
"""

from __future__ import annotations

from enum import Enum


class JobStatus(str, Enum):
    """Lifecycle state of a job."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """True for states a job never leaves."""
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUEUED, JobStatus.RUNNING}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}
"""Allowed ``from -> to`` moves. ``running -> running`` is a re-claim of a job whose worker stopped heartbeating;
``queued -> failed`` is the reconciler giving up after ``MAX_ATTEMPTS``."""


def can_transition(src: JobStatus | str, dst: JobStatus | str) -> bool:
    """Whether a job may move from ``src`` to ``dst``."""
    return JobStatus(dst) in TRANSITIONS[JobStatus(src)]


class ErrorCode(str, Enum):
    """Top-level error code of a failed job: whose fault it was."""

    USER_ERROR = "user_error"
    """The spec or the named inputs are at fault (a ``LoRAShearError`` with ``user_error``); retrying won't help."""
    PLATFORM_ERROR = "platform_error"
    """Our failure: a bug, a lost worker, a time limit, resources."""
