"""The recovery stage: two-stage LoRA fine-tuning with re-weighted data (ALGORITHM.md section 5).

Stage 1 re-weights the pretraining-style sub-datasets, stage 2 the instruction sub-datasets. Each round starts by
measuring every sub-dataset's validation loss against the dense reference (:func:`~lorashear.recovery.mixing.
mix_weights`), then trains ``steps_per_round`` AdamW steps on batches drawn by those weights. :func:`recover` is
resumable from the :class:`~lorashear.events.LoopState` it hands to ``hooks.save``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lorashear import checkpoint as ckpt
from lorashear.config import RecoveryConfig
from lorashear.data import SubDataset
from lorashear.evaluation.loss import mean_loss
from lorashear.events import Hooks, LoopState
from lorashear.recovery.mixing import mix_weights, round_record
from lorashear.training import clip_gradients, lr_factor, train_loss, trainable_groups

STAGE = "recover"


@dataclass
class RecoveryStage:
    """One recovery stage: its number (1 pretraining-style, 2 instruction), sub-datasets and rounds."""

    number: int
    datasets: list[SubDataset]
    rounds: int


def recovery_stages(train: list[SubDataset], instruct: list[SubDataset], cfg: RecoveryConfig) -> list[RecoveryStage]:
    """The stages ``cfg`` asks for: none when disabled, stage 2 only with instruction data and rounds."""
    if not cfg.enabled:
        return []
    stages = [RecoveryStage(1, train, cfg.rounds)]
    rounds2 = cfg.rounds if cfg.instruct_rounds is None else cfg.instruct_rounds
    if instruct and rounds2:
        stages.append(RecoveryStage(2, instruct, rounds2))
    return stages


@dataclass
class RecoveryResult:
    """What recovery did.

    Attributes:
        rounds: per round, every sub-dataset's loss, reference loss, deviation and new mix weight.
        stopped_early: ``{stage number: round}`` where every deviation fell below ``tau``.
        losses: training loss of every step, nats per token.
    """

    rounds: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: dict[str, int] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecoveryResult:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)

    def summary(self) -> dict[str, Any]:
        """The report's view: rounds, early stops, every step's loss (for ``report.png``), first and last."""
        return {
            "rounds": self.rounds,
            "stopped_early": self.stopped_early,
            "losses": [round(x, 5) for x in self.losses],
            "loss_first": self.losses[:5],
            "loss_last": self.losses[-5:],
        }


@dataclass
class _Progress:
    stage_index: int = 0
    round: int = 0
    step: int = 0
    weights: list[float] | None = None
    mixed: bool = False  # this round's weights are set (a resume must not re-weight twice)


def recover(
    model: nn.Module,
    stages: list[RecoveryStage],
    reference_losses: dict[str, float],
    cfg: RecoveryConfig,
    gen: torch.Generator,
    *,
    max_grad_norm: float = 1.0,
    hooks: Hooks | None = None,
    resume: LoopState | None = None,
    teacher: nn.Module | None = None,
) -> RecoveryResult:
    """Fine-tune the LoRA of the pruned model with dynamically re-weighted data.

    Args:
        model: the pruned PEFT model; only the LoRA weights train.
        stages: from :func:`recovery_stages`.
        reference_losses: the dense model's validation loss per sub-dataset name (nats per token).
        cfg: rounds, steps, learning rate and its schedule, weighting rule, weight averaging (``ema``).
        gen: the data generator (batch sampling and sub-dataset draws); the caller checkpoints its state.
        max_grad_norm: gradient clipping (L2 norm of the LoRA gradients).
        hooks: progress, cancellation and checkpoints (optional).
        resume: the loop state a previous, interrupted call saved.
        teacher: the frozen dense model, distilled from with weight ``cfg.distill``.

    Returns:
        :class:`RecoveryResult`.

    Raises:
        DivergedError: a non-finite loss or gradient (names ``recovery.lr``).
        Cancelled: ``hooks.should_cancel`` returned True (a checkpoint was saved first).
    """
    hooks = hooks or Hooks()
    groups = trainable_groups(model)  # the LoRA (AdamW's default decay), then the norms with lora.train_norms
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    result, prog = RecoveryResult(), _Progress()
    total = sum(s.rounds * cfg.steps_per_round for s in stages)
    warmup = min(cfg.warmup_steps, max(total - 1, 0))
    average = [p.detach().clone() for p in params] if cfg.ema else []
    if resume is not None:
        result = RecoveryResult.from_dict(resume.meta["result"])
        prog = _Progress(**resume.meta["progress"])
        opt.load_state_dict(ckpt.unflatten_optimizer("opt", resume.tensors, resume.meta["optimizer"]))
        for i, a in enumerate(average):
            a.copy_(resume.tensors[f"ema.{i}"])
    else:
        hooks.emit(STAGE, "stage_start", 0, total, f"{len(stages)} recovery stage(s), {total} steps")

    def snap() -> LoopState:
        tensors, meta = ckpt.flatten_optimizer("opt", opt.state_dict())
        tensors |= {f"ema.{i}": a for i, a in enumerate(average)}
        return LoopState(STAGE, {"result": result.to_dict(), "progress": asdict(prog), "optimizer": meta}, tensors)

    done_before = sum(s.rounds * cfg.steps_per_round for s in stages[: prog.stage_index])
    while prog.stage_index < len(stages):
        stage = stages[prog.stage_index]
        names = [d.name for d in stage.datasets]
        while prog.round < stage.rounds:
            at = done_before + prog.round * cfg.steps_per_round
            if not prog.mixed:
                losses = [mean_loss(model, d.val_batches) for d in stage.datasets]
                refs = [reference_losses[n] for n in names]
                w, dev = mix_weights(
                    losses, refs, prog.weights, weighting=cfg.weighting, eta=cfg.eta, uniform=cfg.uniform_share
                )
                prog.weights, prog.mixed = w, True
                entry = round_record(stage.number, prog.round, names, losses, refs, w, dev)
                result.rounds.append(entry)
                hooks.emit(
                    STAGE,
                    "log",
                    at,
                    total,
                    f"stage {stage.number} round {prog.round + 1}: weights "
                    + ", ".join(f"{n}={x:.2f}" for n, x in zip(names, w, strict=True)),
                    metrics={f"recovery/weight/{n}": x for n, x in zip(names, w, strict=True)}
                    | {f"recovery/deviation/{n}": d for n, d in zip(names, dev, strict=True)},
                    data=entry,
                )
                if max(dev) < cfg.tau:
                    result.stopped_early[str(stage.number)] = prog.round
                    break
            while prog.step < cfg.steps_per_round:
                hooks.cancel_point(STAGE, snap)
                i = int(torch.multinomial(torch.tensor(prog.weights), 1, generator=gen))
                batch = stage.datasets[i].sample(cfg.batch_size, cfg.seq_len, gen)
                loss = train_loss(model, batch, stage=STAGE, step=at + prog.step, teacher=teacher, distill=cfg.distill)
                clip_gradients(params, max_grad_norm, stage=STAGE, step=at + prog.step)
                lr = cfg.lr * lr_factor(cfg.lr_schedule, at + prog.step, total, warmup)
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.step()
                opt.zero_grad(set_to_none=True)
                if average:
                    with torch.no_grad():
                        for a, p in zip(average, params, strict=True):
                            a.lerp_(p, 1.0 - cfg.ema)
                prog.step += 1
                result.losses.append(loss)
                hooks.emit(
                    STAGE,
                    "progress",
                    at + prog.step,
                    total,
                    f"stage {stage.number} round {prog.round + 1}",
                    metrics={"recovery/loss": loss, f"recovery/loss/{names[i]}": loss, "recovery/lr": lr},
                )
                hooks.step_done(at + prog.step, total, snap)
            prog.round += 1
            prog.step, prog.mixed = 0, False
        done_before += stage.rounds * cfg.steps_per_round
        prog = _Progress(stage_index=prog.stage_index + 1)
    if average:
        with torch.no_grad():
            for a, p in zip(average, params, strict=True):
                p.copy_(a)
    hooks.emit(STAGE, "stage_end", total, total, "recovery done")
    return result
