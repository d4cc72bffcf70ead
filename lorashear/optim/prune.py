"""The LHSPG stage: progressive structured pruning while the LoRA trains (ALGORITHM.md section 3).

:func:`prune` runs the whole schedule (warm-up, then ``periods`` periods of ``period_steps`` steps) and returns a
:class:`PruneResult`: which groups of which structure set are now exactly zero. It is resumable: given the
:class:`~lorashear.events.LoopState` it handed to ``hooks.save``, it continues from that step with the same
optimizer moments, group sets and schedule (the caller restores the weights and the data generator).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from torch import nn

from lorashear import checkpoint as ckpt
from lorashear.budget import Quotas
from lorashear.config import LHSPGConfig
from lorashear.errors import ExactnessError
from lorashear.events import Hooks, LoopState
from lorashear.graph import Structures
from lorashear.importance import TaylorImportance
from lorashear.optim.lhspg import LHSPG
from lorashear.training import train_loss

STAGE = "prune"

ACCUMULATED = ("taylor", "fisher")
"""Values of ``lhspg.importance`` accumulated from the LHSPG steps' own backward passes (:class:`TaylorImportance`);
``lora_saliency`` reads the weights instead."""

_KIND_QUOTA: dict[str, Callable[[Quotas, int | None], int]] = {
    "kv_group": lambda q, layer: q.for_layer(layer).kv_groups,
    "attention_head": lambda q, layer: q.for_layer(layer).kv_groups,
    "query_head": lambda q, layer: q.for_layer(layer).query_heads_per_group,
    "mlp_channel": lambda q, layer: q.for_layer(layer).channels,
    "hidden_dim": lambda q, _layer: q.hidden,
}
"""Structure kind -> groups to remove from each of its quota clusters (query heads: per KV group), by layer."""


def set_quotas(structures: Structures, quotas: Quotas) -> dict[str, dict[int, int]]:
    """Map budget quotas onto structure sets: ``{set key: {cluster id: groups to remove}}`` (prunable sets only).

    Uniform quotas give every layer's set the same count; per-layer quotas (``quotas.layers``) give each layer its
    own (:func:`~lorashear.budget.plan_layer_quotas`).
    """
    out: dict[str, dict[int, int]] = {}
    for s in structures.sets:
        k = _KIND_QUOTA[s.kind](quotas, s.layer)
        if not s.prunable or not k:
            continue
        out[s.key] = {int(c): k for c in s.cluster.unique().tolist()}
    return out


@dataclass
class PruneResult:
    """What LHSPG removed.

    Attributes:
        removed: ``{set key: sorted group indices}``, every one exactly zero in the model.
        history: per period, the step it started and the groups it selected.
        losses: training loss of every step, nats per token.
        projected_early: hsp mode: groups the half-space projection zeroed before their period ended.
    """

    removed: dict[str, list[int]]
    history: list[dict[str, Any]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    projected_early: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruneResult:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)

    def summary(self) -> dict[str, Any]:
        """The report's view: history, every step's loss (for the curves of ``report.png``), first and last."""
        return {
            "history": self.history,
            "losses": [round(x, 5) for x in self.losses],
            "loss_first": self.losses[:5],
            "loss_last": self.losses[-5:],
            "projected_early": self.projected_early,
        }


def _snapshot(opt: LHSPG, losses: list[float], taylor: TaylorImportance | None) -> LoopState:
    state = opt.state_dict()
    tensors, inner = ckpt.flatten_optimizer("opt", state.pop("inner"))
    if taylor is not None:
        tensors.update({f"taylor.{k}": v for k, v in taylor.state_dict().items()})
    return LoopState(STAGE, {"lhspg": state, "inner": inner, "losses": list(losses)}, tensors)


def _lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of ``batch`` (``input_ids``, ``labels``) under ``model``, nats per token, with its graph."""
    return cast(torch.Tensor, model(input_ids=batch["input_ids"], labels=batch["labels"]).loss)


def prune(
    model: nn.Module,
    structures: Structures,
    quotas: dict[str, dict[int, int]],
    cfg: LHSPGConfig,
    sample: Callable[[], dict[str, torch.Tensor]],
    *,
    hooks: Hooks | None = None,
    resume: LoopState | None = None,
    teacher: nn.Module | None = None,
    importance_sample: Callable[[int], dict[str, torch.Tensor]] | None = None,
) -> PruneResult:
    """Run LHSPG to the end of its schedule.

    Args:
        model: PEFT-wrapped model (LoRA trainable, base frozen); the redundant groups end exactly zero.
        structures: discovery result with ``protected`` set by the analysis.
        quotas: ``{set key: {cluster id: groups to remove}}`` (:func:`set_quotas`).
        cfg: schedule, mode, AdamW and saliency settings.
        sample: returns the next training batch (``input_ids``, ``labels``, ``(B, T)``).
        hooks: progress, cancellation and checkpoints (optional).
        resume: the loop state a previous, interrupted call saved.
        teacher: the frozen dense model, distilled from with weight ``cfg.distill``.
        importance_sample: with ``cfg.importance_data == "calibration"``, the batch (``input_ids``, ``labels``,
            ``(B, T)``) of a step, by 0-based step index, that the importance is accumulated on (a cross-entropy
            forward and backward whose gradients are then dropped) instead of the training batch.

    Returns:
        :class:`PruneResult`.

    Raises:
        DivergedError: a non-finite loss or gradient (names ``lhspg.lr``).
        ExactnessError: a period ended with the wrong count of zero groups (a bug).
        Cancelled: ``hooks.should_cancel`` returned True (a checkpoint was saved first).
    """
    hooks = hooks or Hooks()
    if cfg.importance_data == "calibration" and (importance_sample is None or cfg.importance not in ACCUMULATED):
        raise ValueError("lhspg.importance_data 'calibration' needs importance_sample and an accumulated importance")
    taylor = (
        TaylorImportance(model, structures, keys=quotas, fisher=cfg.importance == "fisher")
        if cfg.importance in ACCUMULATED
        else None
    )
    opt = LHSPG(model, structures, quotas, cfg, importance=taylor)
    losses: list[float] = []
    if resume is not None:
        inner = ckpt.unflatten_optimizer("opt", resume.tensors, resume.meta["inner"])
        opt.load_state_dict({**resume.meta["lhspg"], "inner": inner})
        losses = list(resume.meta["losses"])
        if taylor is not None:
            taylor.load_state_dict({k[7:]: v for k, v in resume.tensors.items() if k.startswith("taylor.")})
    total = cfg.total_steps
    if opt.step_count == 0:
        hooks.emit(STAGE, "stage_start", 0, total, f"LHSPG ({cfg.mode}) for {total} steps")

    def snap() -> LoopState:
        return _snapshot(opt, losses, taylor)

    recorder = taylor if cfg.importance_data == "train" else None  # else ranked on calibration text, below
    while opt.step_count < total:
        hooks.cancel_point(STAGE, snap)
        step = opt.step_count
        if taylor is not None and importance_sample is not None and recorder is None:
            model.eval()
            taylor.accumulate(functools.partial(_lm_loss, model, importance_sample(step)))
            model.zero_grad(set_to_none=True)
        with recorder.recording() if recorder is not None else contextlib.nullcontext():
            loss = train_loss(model, sample(), stage=STAGE, step=step, teacher=teacher, distill=cfg.distill)
        info = opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss)
        period, t = opt.phase(step)
        hooks.emit(
            STAGE,
            "progress",
            step + 1,
            total,
            f"period {period + 1}/{cfg.periods}" if period >= 0 else "warm-up",
            metrics={
                "lhspg/loss": loss,
                "lhspg/grad_norm": info["grad_norm"],
                "lhspg/groups_zero": info["groups_zero"],
            },
        )
        if t == cfg.period_steps - 1 and period >= 0:
            opt.check_period(period)
        hooks.step_done(step + 1, total, snap)
    removed = opt.removed()
    want = {k: sum(v.values()) for k, v in quotas.items()}
    got = {k: len(removed.get(k, [])) for k in want}
    if got != want:
        raise ExactnessError(f"LHSPG removed {got} groups, quotas were {want}")
    hooks.emit(STAGE, "stage_end", total, total, f"{sum(want.values())} groups driven to zero")
    return PruneResult(removed, opt.history, losses, opt.projected_early)
