"""Progress events the pipeline emits, and the hooks a caller passes (standard library only).

The CLI renders events as progress bars; the worker stores them as job events and metric points. Every stage verb
takes an optional :class:`Hooks`: with none it simply runs; the pipeline passes one that reports progress, polls
cancellation and writes resumable checkpoints (issue 10).
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


@dataclass
class LoopState:
    """The resumable state of a training loop inside a stage (LHSPG, recovery).

    Attributes:
        stage: the stage the loop belongs to (one of :data:`STAGES`).
        meta: JSON-ready counters and records (step, group sets, mix weights, losses so far).
        tensors: named tensors (optimizer moments); saved as safetensors, never pickled.
    """

    stage: str
    meta: dict[str, Any]
    tensors: dict[str, Any] = field(default_factory=dict)


Snapshot = Callable[[], LoopState]
"""Returns the current state of a running loop, called only when a checkpoint is written."""


@dataclass
class Hooks:
    """What a stage verb reports to and asks of its caller.

    Attributes:
        on_event: receives every :class:`Event`.
        should_cancel: polled at every cancel point (between optimizer steps, between analysis probes).
        save: writes a resumable checkpoint; called with the running loop's state, or ``None`` between loops.
        checkpoint_every: optimizer steps between periodic checkpoints (0: only on cancel).
    """

    on_event: EventHook | None = None
    should_cancel: CancelHook | None = None
    save: Callable[[LoopState | None], None] | None = None
    checkpoint_every: int = 0

    def emit(
        self,
        stage: str,
        kind: str,
        step: int = 0,
        total: int = 0,
        message: str = "",
        metrics: dict[str, float] | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        """Send one :class:`Event` to ``on_event`` (nothing when unset)."""
        if self.on_event is not None:
            self.on_event(Event(stage, kind, step, total, message, metrics or {}, data or {}))

    def cancel_point(self, stage: str, snapshot: Snapshot | None = None) -> None:
        """Stop here if cancellation was asked for: checkpoint first, then raise.

        Raises:
            lorashear.errors.Cancelled: ``should_cancel`` returned True.
        """
        if self.should_cancel is not None and self.should_cancel():
            from lorashear.errors import Cancelled

            if self.save is not None:
                self.save(snapshot() if snapshot is not None else None)
            self.emit(stage, "log", message="cancelled; checkpoint written")
            raise Cancelled("cancelled by request")

    def step_done(self, step: int, total: int, snapshot: Snapshot) -> None:
        """Write a periodic checkpoint every ``checkpoint_every`` steps (not after the last: the stage end does)."""
        if self.save is not None and self.checkpoint_every and step % self.checkpoint_every == 0 and step < total:
            self.save(snapshot())
