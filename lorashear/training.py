"""What the two training loops (LHSPG, recovery) share: one step's loss and the checks that catch divergence.

Issue 7, item 6: a run whose training diverged must never ship. Every step's loss and gradient norm must be
finite, and after every stage the model's logits on a fixed probe must be finite and carry information (not the
same distribution at every position, not worse than a uniform guess). A failure raises
:class:`~lorashear.errors.DivergedError`, a user error naming the learning rate that usually causes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lorashear.errors import DivergedError

LR_FIELD = {"prune": "lhspg.lr", "recover": "recovery.lr"}
"""The spec field to blame when a stage's training diverges."""


LR_SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": lambda progress: 1.0,
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
}
"""Learning-rate multipliers of ``recovery.lr_schedule`` (issue 9), as a function of the fraction 0-1 of the
decay steps done."""


def lr_factor(schedule: str, step: int, total: int, warmup: int = 0) -> float:
    """Multiplier of the base learning rate for 0-based optimizer step ``step`` of ``total``.

    Linear warm-up from ``1 / (warmup + 1)`` to 1 over the first ``warmup`` steps, then the schedule over the rest,
    evaluated at the step's midpoint so the last step still trains (``cosine`` and ``linear`` approach 0 at the
    end). Stateless: a resumed run computes the same value from the step alone.

    Args:
        schedule: a key of :data:`LR_SCHEDULES`.
        step: 0-based optimizer step, ``0 <= step < total``.
        total: planned optimizer steps of the whole schedule.
        warmup: warm-up steps, ``0 <= warmup < total``.

    Returns:
        The factor, in ``(0, 1]``.

    Raises:
        KeyError: an unknown schedule (the spec's validation names the field first).
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    decay = max(total - warmup, 1)
    return LR_SCHEDULES[schedule](min((step - warmup + 0.5) / decay, 1.0))


def _hint(stage: str) -> str:
    field = LR_FIELD.get(stage)
    return f"lower {field}" if field else "check the learning rates"


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``KL(teacher || student)`` of the next-token distributions, mean over scored positions, nats.

    Args:
        student: logits ``(B, T, vocab)`` (with gradients).
        teacher: the dense model's logits ``(B, T, vocab)``.
        labels: ``(B, T)``; position ``t`` predicts ``labels[:, t + 1]`` and counts when that is not ``-100``.
    """
    mask = (labels[:, 1:] != -100).reshape(-1)
    vocab = student.shape[-1]
    s = torch.log_softmax(student[:, :-1].float(), dim=-1).reshape(-1, vocab)[mask]
    t = torch.log_softmax(teacher[:, :-1].float(), dim=-1).reshape(-1, vocab)[mask]
    return torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")


def train_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    stage: str,
    step: int,
    teacher: nn.Module | None = None,
    distill: float = 0.0,
) -> float:
    """Forward and backward one batch; the caller steps the optimizer.

    Args:
        model: the (PEFT-wrapped) model, put in train mode.
        batch: ``input_ids``, ``labels`` and optionally ``attention_mask``, each ``(B, T)``.
        stage: ``prune`` or ``recover`` (names the field in errors).
        step: 0-based optimizer step within the stage.
        teacher: the frozen dense model, for distillation.
        distill: weight 0-1 of :func:`distillation_loss` against the cross-entropy (issue 9).

    Returns:
        The training loss (cross-entropy, or the mix with distillation), nats per target token.

    Raises:
        DivergedError: the loss is not finite.
    """
    model.train()
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    out = model(**batch, use_cache=False)
    loss = out.loss
    if teacher is not None and distill > 0:
        with torch.no_grad():
            kwargs = {k: v for k, v in batch.items() if k != "labels"}
            dense = teacher(**kwargs, use_cache=False).logits
        loss = (1 - distill) * loss + distill * distillation_loss(out.logits, dense, batch["labels"])
    if not torch.isfinite(loss):
        dtype = next(model.parameters()).dtype
        raise DivergedError(
            f"{stage} step {step}: the training loss is {float(loss)} (dtype {str(dtype).replace('torch.', '')}); "
            f"{_hint(stage)}"
            + ("; float16 overflows easily: use bfloat16 or float32" if dtype == torch.float16 else ""),
            field=LR_FIELD.get(stage),
        )
    loss.backward()
    return float(loss.detach())


def norm_parameter_names(model: nn.Module) -> list[str]:
    """Names of the normalisation layers' parameters (RMSNorm, LayerNorm; any module class named ``*Norm``),
    each ``(hidden_size,)`` in a LLaMA-family model: what ``lora.train_norms`` trains (issue 9)."""
    names = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.LayerNorm) or type(mod).__name__.endswith("Norm"):
            names += [f"{mod_name}.{n}" if mod_name else n for n, _ in mod.named_parameters(recurse=False)]
    return names


def trainable_groups(model: nn.Module, weight_decay: float | None = None) -> list[dict[str, Any]]:
    """The trainable parameters as optimizer parameter groups: the LoRA weights (with ``weight_decay``; ``None``
    keeps the optimizer's default), then the normalisation weights when ``lora.train_norms`` made them trainable,
    never decayed (a decayed norm weight shrinks a layer's output). Returns one group when no norm trains, so the
    optimizer state of a LoRA-only run is what it always was (issue 9)."""
    norms = set(norm_parameter_names(model))
    lora = [p for n, p in model.named_parameters() if p.requires_grad and n not in norms]
    tuned = [p for n, p in model.named_parameters() if p.requires_grad and n in norms]
    first: dict[str, Any] = {"params": lora}
    if weight_decay is not None:
        first["weight_decay"] = weight_decay
    return [first] + ([{"params": tuned, "weight_decay": 0.0}] if tuned else [])


def clip_gradients(params: Iterable[nn.Parameter], max_norm: float, *, stage: str, step: int) -> float:
    """Clip the gradients' global L2 norm to ``max_norm`` and return the norm before clipping.

    Raises:
        DivergedError: the norm is not finite.
    """
    norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm)
    if not torch.isfinite(norm):
        raise DivergedError(
            f"{stage} step {step}: the LoRA gradient norm is {float(norm)}; {_hint(stage)}", field=LR_FIELD.get(stage)
        )
    return float(norm)


@torch.no_grad()
def check_sane(model: nn.Module, probe_ids: torch.Tensor, *, stage: str, step: int | None = None) -> float:
    """Check that the model's weights and logits are finite and that its output carries information.

    Three failures, each a :class:`DivergedError` naming the stage, the step and the learning rate field:
    non-finite weights or logits; logits (nearly) constant over the vocabulary at every position (a model that
    predicts the uniform distribution, as after a 1e6 learning rate); mean loss on the probe above
    ``log(vocab) + 2`` nats (more than 7x worse than a uniform guess).

    Args:
        model: the model (PEFT-wrapped or plain).
        probe_ids: ``(B, T)`` token ids of held-out text, ``T >= 2``.
        stage: the stage just finished.
        step: the optimizer step, when inside a loop.

    Returns:
        The mean loss on the probe, nats per token.

    Raises:
        DivergedError: see above.
    """
    where = f"after {stage}" + (f" step {step}" if step is not None else "")
    field = LR_FIELD.get(stage)
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise DivergedError(f"{where}: parameter {name} holds non-finite values; {_hint(stage)}", field=field)
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    x = probe_ids.to(device)
    logits = model(input_ids=x, use_cache=False).logits.float()  # (B, T, vocab)
    model.train(was)
    if not torch.isfinite(logits).all():
        raise DivergedError(f"{where}: the logits are not finite; {_hint(stage)}", field=field)
    spread = logits.std(dim=-1)  # (B, T)
    if float(spread.max()) < 1e-4:
        raise DivergedError(
            f"{where}: the logits are the same for every token at every position (uniform output); {_hint(stage)}",
            field=field,
        )
    vocab = logits.shape[-1]
    loss = float(
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), x[:, 1:].reshape(-1), reduction="mean")
    )
    if loss > math.log(vocab) + 2:
        raise DivergedError(
            f"{where}: loss {loss:.2f} nats per token, worse than a uniform guess over {vocab} tokens "
            f"({math.log(vocab):.2f}); {_hint(stage)}",
            field=field,
        )
    return loss
