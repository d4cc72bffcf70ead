"""Knowledge-distribution analysis (ALGORITHM.md section 2).

Two measurements on held-out calibration text:

1. **Group knowledge scores** [ours]: :class:`~lorashear.importance.TaylorImportance`, the first-order estimate of
   the loss change when a group is removed, accumulated over the calibration windows.
2. **Per-layer sensitivity map** [paper]: for each layer node group (attention of layer l, MLP of layer l), mask
   the ``ablation_fraction`` of its groups ranked lowest by ``probe`` (their consumer inputs are zeroed, which
   equals removing them) and measure the loss deviation against the dense model; restore. Reported per layer.
   ``probe``: ``magnitude`` (weight L2 norm; the paper's probe, the default) or ``taylor`` (the knowledge scores of
   step 1: the groups LHSPG's Taylor importance removes first).

Unprunable ratio gamma [paper]: the uniform layout keeps the same width in every layer, so whole layers cannot be
exempt; instead the top ``ceil(gamma * n)`` groups of each layer's set (per kind, per quota cluster for query
heads) by knowledge score are marked unprunable (:func:`protect`). The layer map still shows where knowledge
concentrates.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorashear.config import AnalysisConfig
from lorashear.evaluation.loss import lm_loss, mean_loss, window_batches
from lorashear.graph import Structures, StructureSet
from lorashear.importance import MagnitudeImportance, TaylorImportance


@dataclass
class Analysis:
    """Result of the analysis.

    Attributes:
        dense_loss: mean loss of the dense model on the calibration windows (nats per token).
        layer_map: per layer and node group (``attention``/``mlp``): loss with the ablation, its deviation from
            the dense loss (nats) and the perplexity ratio.
        protected: ``{set key: [protected groups]}``.
    """

    dense_loss: float
    layer_map: list[dict[str, Any]]
    protected: dict[str, list[int]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"dense_loss": self.dense_loss, "layer_map": self.layer_map, "protected": self.protected}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Analysis:
        """Inverse of :meth:`to_dict`."""
        return cls(
            float(data["dense_loss"]), list(data["layer_map"]), {k: list(v) for k, v in data["protected"].items()}
        )

    def most_sensitive(self, n: int = 3) -> str:
        """The ``n`` layer node groups whose ablation cost the most, e.g. ``mlp@0 (+4.130), attention@1 (+3.100)``."""
        worst = sorted(self.layer_map, key=lambda r: -r["deviation"])[:n]
        return ", ".join(f"{r['node_group']}@{r['layer']} (+{r['deviation']:.3f})" for r in worst)

    def apply(self, structures: Structures) -> None:
        """Set every structure set's ``protected`` flags from :attr:`protected` (e.g. after a resume)."""
        for s in structures.sets:
            s.protected = torch.zeros(s.n_groups, dtype=torch.bool)
            s.protected[self.protected.get(s.key, [])] = True


def _consumer_mask_hooks(model: nn.Module, s: StructureSet, groups: torch.Tensor) -> list[Any]:
    """Pre-hooks that zero the consumer-input columns of ``groups`` (equivalent to removing them)."""
    mods = dict(model.named_modules())
    hooks = []
    for sl in s.slices:
        if sl.role != "consumer" or sl.lora is not None or sl.param.endswith(".bias"):
            continue
        mod = mods[sl.param.rsplit(".", 1)[0]]
        cols = sl.index[groups].flatten()

        def pre(_m: nn.Module, args: tuple, cols: torch.Tensor = cols) -> tuple:
            x = args[0].clone()
            x[..., cols.to(x.device)] = 0
            return (x, *args[1:])

        hooks.append(mod.register_forward_pre_hook(pre))
    return hooks


def protect(structures: Structures, scores: dict[str, torch.Tensor], gamma: float) -> dict[str, list[int]]:
    """Mark the top ``ceil(gamma * n)`` groups of every quota cluster of every set unprunable, by score.

    Args:
        structures: its sets' ``protected`` flags are overwritten.
        scores: ``{set key: (G,)}``, higher = more knowledge.
        gamma: unprunable ratio, fraction 0-1; 0 protects nothing.

    Returns:
        ``{set key: [protected groups]}`` (ascending).
    """
    out: dict[str, list[int]] = {}
    for s in structures.sets:
        sc = scores[s.key]
        prot = torch.zeros(s.n_groups, dtype=torch.bool)
        if gamma > 0:
            for cid in s.cluster.unique().tolist():
                members = torch.nonzero(s.cluster == cid).flatten()
                n_keep = max(1, math.ceil(gamma * len(members) - 1e-9))
                top = members[torch.argsort(sc[members], descending=True, stable=True)[:n_keep]]
                prot[top] = True
        s.protected = prot
        out[s.key] = torch.nonzero(prot).flatten().tolist()
    return out


def analyze(
    model: nn.Module,
    structures: Structures,
    windows: list[torch.Tensor],
    cfg: AnalysisConfig | None = None,
    *,
    batch_size: int = 8,
    on_step: Callable[[int, int], None] | None = None,
) -> Analysis:
    """Measure the layer map and group knowledge scores; mark the top-gamma groups of every set unprunable.

    Args:
        model: the (PEFT-wrapped) dense model; unchanged on return (gradients are cleared).
        structures: discovery result; ``protected`` of every set is overwritten.
        windows: calibration token windows ``(T,)`` each.
        cfg: ``gamma``, ``ablation_fraction`` and ``probe`` (defaults: :class:`AnalysisConfig`).
        batch_size: windows per forward pass.
        on_step: ``(done, total)`` progress callback, called between probes (a cancel point for the caller).

    Returns:
        :class:`Analysis`.
    """
    cfg = cfg or AnalysisConfig()
    batches = window_batches(windows, batch_size)
    layered = [s for s in structures.sets if s.layer is not None and s.kind != "query_head"]
    total = len(layered) + 2
    was_training = model.training
    model.eval()
    taylor = TaylorImportance(model, structures)
    device = next(model.parameters()).device
    for b in batches:
        x = b["input_ids"].to(device)
        taylor.accumulate(functools.partial(lm_loss, model, x))
        model.zero_grad(set_to_none=True)
    if on_step:
        on_step(1, total)
    rankings: dict[str, Callable[[StructureSet], torch.Tensor]] = {
        "magnitude": MagnitudeImportance(dict(model.named_parameters(remove_duplicate=False))),
        "taylor": taylor,
    }
    rank = rankings[cfg.probe]
    dense = mean_loss(model, batches)
    layer_map = []
    for i, s in enumerate(layered):
        k = max(1, int(round(cfg.ablation_fraction * s.n_groups)))
        groups = torch.argsort(rank(s), stable=True)[:k]
        hooks = _consumer_mask_hooks(model, s, groups)
        try:
            loss = mean_loss(model, batches)
        finally:
            for h in hooks:
                h.remove()
        layer_map.append(
            {
                "layer": s.layer,
                "node_group": "attention" if s.kind in ("kv_group", "attention_head") else "mlp",
                "ablated_groups": k,
                "loss": loss,
                "deviation": loss - dense,
                "perplexity_ratio": math.exp(loss - dense),
            }
        )
        if on_step:
            on_step(i + 2, total)
    if on_step:
        on_step(total, total)
    protected = protect(structures, taylor.scores(), cfg.gamma)
    model.train(was_training)
    return Analysis(dense, layer_map, protected)


__all__ = ["Analysis", "analyze", "protect"]
