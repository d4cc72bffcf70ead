"""The one loss evaluator: summed negative log-likelihood over a batch's target tokens.

The knowledge analysis, the recovery's deviation measurements and perplexity all score text through
:func:`token_nll`, so "loss" means the same thing everywhere (issue 10): nats per target token, where the target
of position ``t`` is ``labels[:, t + 1]`` and positions labelled ``-100`` (prompt, padding, context carried over
from an earlier window) are not scored.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


@torch.no_grad()
def token_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """Summed negative log-likelihood of a batch's target tokens, and how many were scored.

    Args:
        model: a causal LM (PEFT-wrapped or plain).
        batch: ``input_ids`` ``(B, T)``; optional ``labels`` ``(B, T)`` (default: ``input_ids``; ``-100`` is not
            scored) and ``attention_mask`` ``(B, T)``.

    Returns:
        ``(nll in nats summed over scored tokens, number of scored tokens)``.
    """
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    labels = batch.get("labels", batch["input_ids"]).to(device)
    mask = batch.get("attention_mask")
    kwargs = {"attention_mask": mask.to(device)} if mask is not None else {}
    logits = model(input_ids=ids, use_cache=False, **kwargs).logits  # (B, T, vocab)
    vocab = logits.shape[-1]
    target = labels[:, 1:].reshape(-1)
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).float(), target, ignore_index=-100, reduction="sum"
    )
    return float(nll), int((target != -100).sum())


def lm_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The model's own mean next-token loss on ``input_ids`` ``(B, T)``, with gradients (for importance scores)."""
    return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss


def mean_loss(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Mean loss per scored token over fixed batches, nats (0.0 when nothing is scored). Leaves the mode as it was."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        for b in batches:
            s, k = token_nll(model, b)
            total += s
            n += k
    finally:
        model.train(was)
    return total / max(n, 1)


def window_batches(windows: list[torch.Tensor], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Stack ``(T,)`` token windows into batches of ``input_ids`` ``(<= batch_size, T)``."""
    return [{"input_ids": torch.stack(windows[i : i + batch_size])} for i in range(0, len(windows), batch_size)]
