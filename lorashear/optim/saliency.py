"""Group saliency for LHSPG (ALGORITHM.md section 3, "Saliency" [code]).

``W`` is frozen, so there is no ``grad W``; the LoRA update ``s * B A`` stands in for the accumulated update. Per
group, over its base (non-LoRA) slices ``W_g`` and the matching slices ``(BA)_g``:

* ``magnitude`` = ||W_g||; ``avg_magnitude`` = ||W_g|| / |g|;
* ``cosine`` = cos(W_g, (BA)_g) + 1 (1 when the LoRA has not moved);
* ``taylor_first_order`` = |<W_g, (BA)_g>|; ``taylor_second_order`` = 0.5 * taylor_first_order^2.

Each criterion is divided by its L2 norm over the set's groups, weighted and summed. Lower = removed first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorashear.graph import StructureSet


@dataclass
class LoraRef:
    """The LoRA of one adapted linear: ``delta W = scaling * B @ A``."""

    A: nn.Parameter
    B: nn.Parameter
    scaling: float


def lora_refs(model: nn.Module) -> dict[str, LoraRef]:
    """``{base weight param name: LoraRef}`` for every PEFT LoRA layer (adapter ``default``)."""
    refs: dict[str, LoraRef] = {}
    for name, mod in model.named_modules():
        base = getattr(mod, "base_layer", None)
        if base is None or not hasattr(mod, "lora_A") or "default" not in getattr(mod, "lora_A", {}):
            continue
        refs[f"{name}.base_layer.weight"] = LoraRef(
            mod.lora_A["default"].weight, mod.lora_B["default"].weight, float(mod.scaling["default"])
        )
    return refs


@torch.no_grad()
def group_stats(
    sset: StructureSet, params: dict[str, torch.Tensor], refs: dict[str, LoraRef]
) -> dict[str, torch.Tensor]:
    """Per group ``(G,)``: ``w2`` = ||W_g||^2, ``d2`` = ||(sBA)_g||^2, ``wd`` = <W_g, (sBA)_g>, ``n`` = |g|."""
    G = sset.n_groups
    w2 = torch.zeros(G, dtype=torch.float64)
    d2 = torch.zeros(G, dtype=torch.float64)
    wd = torch.zeros(G, dtype=torch.float64)
    n = torch.zeros(G, dtype=torch.float64)
    seen: set[tuple[int, int]] = set()
    for sl in sset.slices:
        if sl.lora is not None:
            continue
        W = params[sl.param]
        if (W.data_ptr(), sl.dim) in seen:
            continue
        seen.add((W.data_ptr(), sl.dim))
        Wf = W.detach().float()
        ref = refs.get(sl.param)
        D = ref.scaling * (ref.B.detach().float() @ ref.A.detach().float()) if ref is not None else None
        red = tuple(d for d in range(Wf.dim()) if d != sl.dim)
        vw2 = (Wf * Wf).sum(dim=red) if red else Wf * Wf
        idx = sl.index
        w2 += vw2[idx].sum(1).double().cpu()
        n += idx.shape[1] * (Wf.numel() // Wf.shape[sl.dim])
        if D is not None:
            vd2 = (D * D).sum(dim=red)
            vwd = (Wf * D).sum(dim=red)
            d2 += vd2[idx].sum(1).double().cpu()
            wd += vwd[idx].sum(1).double().cpu()
    return {"w2": w2, "d2": d2, "wd": wd, "n": n}


def saliency(stats: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Weighted sum of the L2-normalised criteria, ``(G,)``; lower = less salient."""
    w = stats["w2"].sqrt()
    d = stats["d2"].sqrt()
    crit = {
        "magnitude": w,
        "avg_magnitude": w / stats["n"].clamp(min=1),
        "cosine": torch.where((w > 0) & (d > 0), stats["wd"] / (w * d).clamp(min=1e-30), torch.zeros_like(w)) + 1,
        "taylor_first_order": stats["wd"].abs(),
        "taylor_second_order": 0.5 * stats["wd"] ** 2,
    }
    total = torch.zeros_like(w)
    for name, weight in weights.items():
        c = crit[name]
        norm = c.norm()
        if weight and norm > 0:
            total += weight * c / norm
    return total
