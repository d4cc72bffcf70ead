"""Progress events the pipeline emits, and the hooks a caller passes (standard library only).

The CLI renders events as progress bars; the worker stores them as job events and metric points.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

STAGES = ("load", "discover", "analyze", "prune", "compress", "recover", "evaluate", "export")
"""Pipeline stages in order (ALGORITHM.md section 0)."""


@dataclass
class Event:
    """One progress report.

    Attributes:
        stage: one of :data:`STAGES`.
        kind: ``stage_start``, ``progress``, ``stage_end`` or ``log``.
        step: steps done in this stage (optimizer steps for prune/recover, units of work elsewhere).
        total: steps this stage will take (0 when unknown).
        message: one human-readable line.
        metrics: named values at this step, e.g. ``{"lhspg/loss": 2.1, "lhspg/groups_zero": 40}``; losses in nats,
            ratios as fractions 0-1, times in seconds.
        time: UNIX time of the event, seconds.
    """

    stage: str
    kind: str
    step: int = 0
    total: int = 0
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "stage": self.stage,
            "kind": self.kind,
            "step": self.step,
            "total": self.total,
            "message": self.message,
            "metrics": dict(self.metrics),
            "data": dict(self.data),
            "time": self.time,
        }


EventHook = Callable[[Event], None]
"""Called with every event; must return quickly (the pipeline waits for it)."""

CancelHook = Callable[[], bool]
"""Polled between steps; returning ``True`` stops the run with :class:`lorashear.errors.Cancelled` after the
current step (a checkpoint is written first, so the run can resume)."""
