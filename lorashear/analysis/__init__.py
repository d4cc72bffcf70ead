"""Knowledge-distribution analysis (ALGORITHM.md section 2).

Two measurements on held-out calibration text:

1. **Per-layer sensitivity map** [paper]: for each layer node group (attention of layer l, MLP of layer l), mask
   the ``ablation_fraction`` of its groups with the smallest weight magnitude (their consumer inputs are zeroed,
   which equals removing them) and measure the loss deviation against the dense model; restore. Reported per layer.
2. **Group knowledge scores** [ours]: the first-order estimate of the loss change when a group is removed,
   ``|sum_tokens <dL/da_g, a_g>|`` over the consumer inputs ``a_g`` it feeds, accumulated over calibration windows.

Unprunable ratio gamma [paper]: the uniform layout keeps the same width in every layer, so whole layers cannot be
exempt; instead the top ``ceil(gamma * n)`` groups of each layer's set (per kind, per quota cluster for query
heads) by knowledge score are marked unprunable. The layer map still shows where knowledge concentrates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorashear.graph import Structures, StructureSet


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


@torch.no_grad()
def _loss(model: nn.Module, windows: list[torch.Tensor], batch: int) -> float:
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for i in range(0, len(windows), batch):
        x = torch.stack(windows[i : i + batch]).to(device)
        out = model(input_ids=x, labels=x, use_cache=False)
        k = x.numel() - x.shape[0]
        total += float(out.loss) * k
        n += k
    return total / max(n, 1)


def _magnitude(s: StructureSet, params: dict[str, torch.Tensor]) -> torch.Tensor:
    score = torch.zeros(s.n_groups, dtype=torch.float64)
    for sl in s.slices:
        if sl.lora is not None:
            continue
        p = params[sl.param].detach().float()
        red = tuple(d for d in range(p.dim()) if d != sl.dim)
        v = (p * p).sum(dim=red) if red else p * p
        score += v.cpu()[sl.index].sum(1).double()
    return score.sqrt()


def analyze(
    model: nn.Module,
    structures: Structures,
    windows: list[torch.Tensor],
    *,
    gamma: float,
    ablation_fraction: float,
    batch_size: int = 8,
    on_step: Callable[[int, int], None] | None = None,
) -> Analysis:
    """Measure the layer map and group knowledge scores; mark the top-gamma groups of every set unprunable.

    Args:
        model: the (PEFT-wrapped) dense model; unchanged on return.
        structures: discovery result; ``protected`` of every set is overwritten.
        windows: calibration token windows ``(T,)`` each.
        gamma: unprunable ratio, fraction 0-1.
        ablation_fraction: fraction of a layer node group masked for the map.
        batch_size: windows per forward pass.
        on_step: ``(done, total)`` progress callback.

    Returns:
        :class:`Analysis`.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    layered = [s for s in structures.sets if s.layer is not None and s.kind != "query_head"]
    total = len(layered) + 2
    was_training = model.training
    model.eval()
    dense = _loss(model, windows, batch_size)
    layer_map = []
    for i, s in enumerate(layered):
        k = max(1, int(round(ablation_fraction * s.n_groups)))
        groups = torch.argsort(_magnitude(s, params))[:k]
        hooks = _consumer_mask_hooks(model, s, groups)
        try:
            loss = _loss(model, windows, batch_size)
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
            on_step(i + 1, total)
    scores = knowledge_scores(model, structures, windows, batch_size)
    if on_step:
        on_step(total, total)
    protected: dict[str, list[int]] = {}
    for s in structures.sets:
        sc = scores[s.key]
        prot = torch.zeros(s.n_groups, dtype=torch.bool)
        if gamma > 0:
            for cid in s.cluster.unique().tolist():
                members = torch.nonzero(s.cluster == cid).flatten()
                n_keep = max(1, math.ceil(gamma * len(members) - 1e-9))
                top = members[torch.argsort(sc[members], descending=True)[:n_keep]]
                prot[top] = True
        s.protected = prot
        protected[s.key] = torch.nonzero(prot).flatten().tolist()
    model.train(was_training)
    return Analysis(dense, layer_map, protected)


def knowledge_scores(
    model: nn.Module, structures: Structures, windows: list[torch.Tensor], batch_size: int
) -> dict[str, torch.Tensor]:
    """First-order loss change of removing each group: ``|sum <dL/da_g, a_g>|`` over its consumer inputs.

    Returns:
        ``{set key: (G,) scores}``; the hidden dimension is scored on every consumer of the residual stream.
    """
    mods = dict(model.named_modules())
    consumers: dict[str, nn.Module] = {}
    for s in structures.sets:
        for sl in s.slices:
            if sl.role == "consumer" and sl.lora is None and not sl.param.endswith(".bias") and sl.dim == 1:
                consumers[sl.param] = mods[sl.param.rsplit(".", 1)[0]]
    acts: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}

    def make(name: str):
        def pre(_m: nn.Module, args: tuple) -> None:
            x = args[0]
            if x.requires_grad:
                acts[name] = x
                x.retain_grad()

        return pre

    hooks = [m.register_forward_pre_hook(make(n)) for n, m in consumers.items()]
    device = next(model.parameters()).device
    emb = model.get_input_embeddings()
    emb_hook = emb.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True))
    try:
        for i in range(0, len(windows), batch_size):
            x = torch.stack(windows[i : i + batch_size]).to(device)
            acts.clear()
            with torch.enable_grad():
                out = model(input_ids=x, labels=x, use_cache=False)
                out.loss.backward()
            for name, a in acts.items():
                if a.grad is None:
                    continue
                contrib = (a.grad.float() * a.detach().float()).sum(dim=tuple(range(a.dim() - 1)))  # (in,)
                sums[name] = sums.get(name, 0) + contrib.abs().cpu().double()
            model.zero_grad(set_to_none=True)
    finally:
        for h in hooks:
            h.remove()
        emb_hook.remove()
    scores: dict[str, torch.Tensor] = {}
    for s in structures.sets:
        sc = torch.zeros(s.n_groups, dtype=torch.float64)
        for sl in s.slices:
            if sl.param in sums and sl.role == "consumer" and sl.dim == 1 and sl.lora is None:
                sc += sums[sl.param][sl.index].sum(1)
        scores[s.key] = sc
    return scores
