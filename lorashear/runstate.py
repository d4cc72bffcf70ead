"""The typed state of one pipeline run, and its checkpoint (issue 10: every stage's result is saved with it).

:class:`RunState` holds the result of every finished stage, the timings, and which stage finished last. A
checkpoint is the state as JSON plus the model's parameters, the random generators and, when a training loop was
interrupted, that loop's :class:`~lorashear.events.LoopState` (:mod:`lorashear.checkpoint` writes the files
atomically). A resumed run loads the model again, replays the finished stages' effects on its shape (analysis
flags, slicing) from the saved results, restores the tensors and continues with the next stage, or inside the
interrupted loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorashear import checkpoint as ckpt
from lorashear.analysis import Analysis
from lorashear.compression import CompressionResult, apply_removed
from lorashear.evaluation.stage import EvaluationResult
from lorashear.events import STAGES, LoopState
from lorashear.graph import Structures
from lorashear.optim import PruneResult
from lorashear.recovery import ReconstructionResult, RecoveryResult

_RESULTS: dict[str, Any] = {
    "dense": EvaluationResult,
    "analysis": Analysis,
    "prune": PruneResult,
    "compression": CompressionResult,
    "pruned": EvaluationResult,
    "reconstruction": ReconstructionResult,
    "recovery": RecoveryResult,
    "final": EvaluationResult,
}
"""Result fields of :class:`RunState` and their types (each has ``to_dict`` / ``from_dict``)."""


@dataclass
class RunState:
    """Everything a run has finished, JSON round-trippable.

    Attributes:
        spec_hash: sha256 of the canonical spec (a checkpoint only resumes the spec that wrote it).
        stage_done: index in :data:`~lorashear.events.STAGES` of the last finished stage (-1: none).
        dense: the dense model's evaluation (before pruning).
        reference_losses: the dense model's validation loss per recovery sub-dataset, nats per token.
        analysis / prune / compression / recovery: the stage results; reconstruction: the least-squares refit at
            the start of recovery (``recovery.reconstruct``), ``None`` without it.
        pruned: evaluation after compression, before recovery. final: after recovery.
        timings: per stage ``{"wall_s", "cpu_peak_rss_mib", ...}``.
    """

    spec_hash: str
    stage_done: int = -1
    dense: EvaluationResult | None = None
    reference_losses: dict[str, float] = field(default_factory=dict)
    analysis: Analysis | None = None
    prune: PruneResult | None = None
    compression: CompressionResult | None = None
    pruned: EvaluationResult | None = None
    reconstruction: ReconstructionResult | None = None
    recovery: RecoveryResult | None = None
    final: EvaluationResult | None = None
    timings: dict[str, dict[str, float]] = field(default_factory=dict)

    def done(self, stage: str) -> bool:
        """Whether ``stage`` finished."""
        return self.stage_done >= STAGES.index(stage)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        out: dict[str, Any] = {
            "spec_hash": self.spec_hash,
            "stage_done": self.stage_done,
            "reference_losses": dict(self.reference_losses),
            "timings": self.timings,
        }
        for name in _RESULTS:
            value = getattr(self, name)
            out[name] = value.to_dict() if value is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunState:
        """Inverse of :meth:`to_dict`."""
        state = cls(data["spec_hash"], int(data["stage_done"]), reference_losses=dict(data["reference_losses"]))
        state.timings = dict(data["timings"])
        for name, typ in _RESULTS.items():
            if data.get(name) is not None:
                setattr(state, name, typ.from_dict(data[name]))
        return state


def save(
    directory: Path, state: RunState, model: nn.Module, gen: torch.Generator, loop: LoopState | None = None
) -> None:
    """Write a checkpoint: the state, every model parameter, both random generators, the running loop's state."""
    tensors = {f"model.{n}": p.detach() for n, p in model.named_parameters()}
    tensors["rng.data"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    meta: dict[str, Any] = {"run": state.to_dict(), "loop": None, "spec_hash": state.spec_hash}
    if loop is not None:
        meta["loop"] = {"stage": loop.stage, "meta": loop.meta, "tensors": sorted(loop.tensors)}
        tensors.update({f"loop.{k}": v for k, v in loop.tensors.items()})
    ckpt.save(directory, meta, tensors)


@dataclass
class Resumed:
    """A loaded checkpoint: the run state, the loop to continue (if any) and the tensors to restore."""

    state: RunState
    loop: LoopState | None
    tensors: dict[str, torch.Tensor]

    def apply(self, model: nn.Module, structures: Structures, gen: torch.Generator) -> None:
        """Bring a freshly loaded model to the checkpoint: the analysis' protected groups, the slicing when the
        compression had finished, then every parameter and both random generators.

        Raises:
            CheckpointError: the checkpoint lacks a parameter of the model or holds one of another shape.
        """
        if self.state.analysis is not None:
            self.state.analysis.apply(structures)
        if self.state.compression is not None and self.state.prune is not None:
            apply_removed(model, structures, self.state.prune.removed)
        self.restore(model, gen)

    def restore(self, model: nn.Module, gen: torch.Generator) -> None:
        """Copy the saved parameters into ``model`` (same shapes) and set both random generators.

        Raises:
            CheckpointError: the checkpoint lacks a parameter of the model or holds one of another shape.
        """
        params = dict(model.named_parameters())
        missing = [n for n in params if f"model.{n}" not in self.tensors]
        if missing:
            raise ckpt.CheckpointError(f"checkpoint lacks {len(missing)} parameters, e.g. {missing[0]}")
        with torch.no_grad():
            for n, p in params.items():
                t = self.tensors[f"model.{n}"]
                if p.shape != t.shape:
                    raise ckpt.CheckpointError(
                        f"checkpoint holds {n} with shape {tuple(t.shape)}, not {tuple(p.shape)}"
                    )
                p.data.copy_(t.to(p.device, p.dtype))
        gen.set_state(self.tensors["rng.data"])
        torch.set_rng_state(self.tensors["rng.torch"])


def load(directory: Path, spec_hash: str) -> Resumed | None:
    """Read a checkpoint of the spec with ``spec_hash``, or ``None`` when there is none.

    Raises:
        CheckpointError: unreadable files, or a checkpoint of another spec.
    """
    loaded = ckpt.load(directory, spec_hash)
    if loaded is None:
        return None
    meta, tensors = loaded
    state = RunState.from_dict(meta["run"])
    loop = None
    if meta.get("loop"):
        lm = meta["loop"]
        loop = LoopState(lm["stage"], lm["meta"], {k: tensors[f"loop.{k}"] for k in lm["tensors"]})
    return Resumed(state, loop, tensors)
