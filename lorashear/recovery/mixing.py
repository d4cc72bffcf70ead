"""Dynamic knowledge recovery: re-weighted data mixing for LoRA fine-tuning (ALGORITHM.md section 5).

Each round: measure the pruned model's loss ``L_i`` on every sub-dataset's validation split, compare with the dense
model's ``L_ref_i`` (measured once before pruning), and set the mix weights

* ``linear``: ``w_i`` proportional to ``d_i = max(L_i - L_ref_i, 0)`` (uniform when every ``d_i`` is 0);
* ``exp``: ``w <- softmax(log w + eta * (L - L_ref))``;

then smooth with a uniform share ``u``: ``w <- (1 - u) w + u / n``. The next ``steps_per_round`` batches are drawn
from sub-dataset ``i`` with probability ``w_i``. A stage stops early once ``max d_i < tau``.
"""

from __future__ import annotations

import math
from typing import Any


def mix_weights(
    losses: list[float], refs: list[float], prev: list[float] | None, *, weighting: str, eta: float, uniform: float
) -> tuple[list[float], list[float]]:
    """New mix weights and the deviations ``d_i = max(L_i - L_ref_i, 0)``.

    Args:
        losses: pruned model's validation loss per sub-dataset (nats per token).
        refs: dense model's loss on the same batches.
        prev: previous weights (``exp`` weighting starts from them; uniform when ``None``).
        weighting: ``linear`` or ``exp``.
        eta: step size of ``exp``.
        uniform: uniform share ``u`` in [0, 1].

    Returns:
        ``(weights summing to 1, deviations)``.
    """
    n = len(losses)
    dev = [max(a - b, 0.0) for a, b in zip(losses, refs, strict=False)]
    if weighting == "linear":
        s = sum(dev)
        w = [d / s for d in dev] if s > 0 else [1.0 / n] * n
    else:
        base = prev or [1.0 / n] * n
        logits = [math.log(max(p, 1e-12)) + eta * (a - b) for p, a, b in zip(base, losses, refs, strict=False)]
        m = max(logits)
        e = [math.exp(x - m) for x in logits]
        w = [x / sum(e) for x in e]
    w = [(1 - uniform) * x + uniform / n for x in w]
    total = sum(w)
    return [x / total for x in w], dev


def round_record(
    stage: int,
    rnd: int,
    names: list[str],
    losses: list[float],
    refs: list[float],
    weights: list[float],
    dev: list[float],
) -> dict[str, Any]:
    """One logged round: per sub-dataset loss, reference loss, deviation and the new weight."""
    return {
        "stage": stage,
        "round": rnd,
        "datasets": {
            n: {"loss": a, "reference_loss": b, "deviation": d, "weight": w}
            for n, a, b, d, w in zip(names, losses, refs, dev, weights, strict=False)
        },
    }
