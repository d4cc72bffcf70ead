"""Group importance: one module for every score of a structure set's groups (ALGORITHM.md sections 2 and 3).

An *importance* is a callable ``(StructureSet) -> (G,) float64 tensor``: higher means more important, so the
lowest-scoring groups are removed first (Torch-Pruning's ``Importance`` is the model). Three kinds live here:

* :class:`MagnitudeImportance` - ``||W_g||`` over the group's base (non-LoRA) slices;
* :class:`LoRASaliency` - the paper code's five criteria on ``W`` and the LoRA update ``s B A`` (section 3,
  "Saliency" [code]), weighted after L2 normalisation;
* :class:`TaylorImportance` - the first-order estimate of the loss change when a group is removed,
  ``|sum_tokens <dL/da_g, a_g>|`` over the consumer inputs ``a_g`` the group feeds, accumulated over batches
  (section 2, "group knowledge scores" [ours]).

:func:`group_sq_norms` is the one group norm the analysis, the saliency and LHSPG share;
:func:`lora_saliency_terms` names the paper's five criteria.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from torch import nn

from lorashear.graph import Structures, StructureSet


class Importance(Protocol):
    """``(StructureSet) -> (G,)`` scores, higher = more important."""

    def __call__(self, sset: StructureSet) -> torch.Tensor: ...


@dataclass
class LoraRef:
    """The LoRA of one adapted linear: ``delta W = scaling * B @ A`` with ``A (r, in)``, ``B (out, r)``."""

    A: nn.Parameter
    B: nn.Parameter
    scaling: float


def lora_refs(model: nn.Module) -> dict[str, LoraRef]:
    """``{base weight param name: LoraRef}`` for every PEFT LoRA layer (adapter ``default``)."""
    refs: dict[str, LoraRef] = {}
    for name, mod in model.named_modules():
        base = getattr(mod, "base_layer", None)
        lora_a = getattr(mod, "lora_A", None)
        if base is None or lora_a is None or "default" not in lora_a:
            continue
        refs[f"{name}.base_layer.weight"] = LoraRef(
            lora_a["default"].weight, mod.lora_B["default"].weight, float(mod.scaling["default"])
        )
    return refs


def _row_reduce(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over every dim but ``dim``: ``(size of dim,)``."""
    red = tuple(d for d in range(x.dim()) if d != dim)
    return x.sum(dim=red) if red else x


@torch.no_grad()
def group_sq_norms(sset: StructureSet, params: Mapping[str, torch.Tensor], *, zero_only: bool = False) -> torch.Tensor:
    """Squared L2 norm of each group's base (non-LoRA) slices, ``(G,)`` float64.

    Args:
        sset: the structure set.
        params: ``{name: tensor}`` of the model the set was discovered on.
        zero_only: only the slices LHSPG drives to zero (producers; query heads' consumers too).

    A tensor reached twice through the same dim (tied weights) counts once.
    """
    out = torch.zeros(sset.n_groups, dtype=torch.float64)
    seen: set[tuple[int, int]] = set()
    for sl in sset.slices:
        if sl.lora is not None or (zero_only and not sl.zero):
            continue
        p = params[sl.param]
        if (p.data_ptr(), sl.dim) in seen:
            continue
        seen.add((p.data_ptr(), sl.dim))
        pf = p.detach().float()
        out += _row_reduce(pf * pf, sl.dim).cpu()[sl.index].sum(1).double()
    return out


class MagnitudeImportance:
    """``||W_g||`` over the base slices of each group."""

    def __init__(self, params: Mapping[str, torch.Tensor]) -> None:
        self.params = params

    def __call__(self, sset: StructureSet) -> torch.Tensor:
        return group_sq_norms(sset, self.params).sqrt()


@torch.no_grad()
def lora_group_stats(
    sset: StructureSet, params: Mapping[str, torch.Tensor], refs: dict[str, LoraRef]
) -> dict[str, torch.Tensor]:
    """Per group ``(G,)``: ``w2`` = ||W_g||^2, ``d2`` = ||(sBA)_g||^2, ``wd`` = <W_g, (sBA)_g>, ``n`` = |g|."""
    G = sset.n_groups
    stats = {k: torch.zeros(G, dtype=torch.float64) for k in ("w2", "d2", "wd", "n")}
    seen: set[tuple[int, int]] = set()
    for sl in sset.slices:
        if sl.lora is not None:
            continue
        W = params[sl.param]
        if (W.data_ptr(), sl.dim) in seen:
            continue
        seen.add((W.data_ptr(), sl.dim))
        Wf = W.detach().float()
        idx = sl.index
        stats["w2"] += _row_reduce(Wf * Wf, sl.dim).cpu()[idx].sum(1).double()
        stats["n"] += idx.shape[1] * (Wf.numel() // Wf.shape[sl.dim])
        ref = refs.get(sl.param)
        if ref is not None:
            D = ref.scaling * (ref.B.detach().float() @ ref.A.detach().float())  # (out, in)
            stats["d2"] += _row_reduce(D * D, sl.dim).cpu()[idx].sum(1).double()
            stats["wd"] += _row_reduce(Wf * D, sl.dim).cpu()[idx].sum(1).double()
    return stats


def lora_saliency_terms(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The paper code's five criteria from :func:`lora_group_stats`, each ``(G,)``, higher = more salient."""
    w = stats["w2"].sqrt()
    d = stats["d2"].sqrt()
    return {
        "magnitude": w,
        "avg_magnitude": w / stats["n"].clamp(min=1),
        "cosine": torch.where((w > 0) & (d > 0), stats["wd"] / (w * d).clamp(min=1e-30), torch.zeros_like(w)) + 1,
        "taylor_first_order": stats["wd"].abs(),
        "taylor_second_order": 0.5 * stats["wd"] ** 2,
    }


def weighted_sum(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """``sum_c weight_c * term_c / ||term_c||`` over the named terms (a zero term contributes nothing)."""
    total: torch.Tensor | None = None
    for name, weight in weights.items():
        c = terms[name]
        total = torch.zeros_like(c) if total is None else total
        norm = c.norm()
        if weight and norm > 0:
            total = total + weight * c / norm
    if total is None:
        raise ValueError("no criteria given")
    return total


class LoRASaliency:
    """The LHSPG saliency of the paper's code: five criteria on ``W`` and ``s B A``, L2-normalised and weighted."""

    def __init__(self, model: nn.Module, weights: dict[str, float]) -> None:
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.refs = lora_refs(model)
        self.weights = weights

    def __call__(self, sset: StructureSet) -> torch.Tensor:
        return weighted_sum(lora_saliency_terms(lora_group_stats(sset, self.params, self.refs)), self.weights)


def _scored(sl: Any) -> bool:
    """A slice whose input channels :class:`TaylorImportance` records: a base (non-LoRA) consumer, input dim."""
    return bool(sl.role == "consumer" and sl.dim == 1 and sl.lora is None)


class TaylorImportance:
    """First-order Taylor importance of each group, from activations and their gradients.

    ``score_g = |sum_tokens <dL/da_g, a_g>|`` where ``a_g`` are the consumer-input channels group ``g`` feeds
    (attention heads' ``o_proj`` inputs, MLP channels' ``down_proj`` inputs, the hidden dimension's inputs of every
    reader of the residual stream). Call :meth:`accumulate` inside the forward/backward of each batch; the score
    is the sum of the per-batch absolute values, per channel, summed over the group's channels.

    With ``fisher=True`` the score is the empirical Fisher estimate of the loss increase when the whole group is
    removed: ``sum_sequences (sum_tokens sum_{c in g} dL/da_c * a_c)^2``, the group's joint first-order term
    squared per sequence (Molchanov et al. 2019, "Importance Estimation for Neural Network Pruning"). Near a
    trained minimum the first-order term averages to zero over many tokens, so its square per sequence carries the
    signal the batch sum cancels; channels of one group add before squaring, so a head's 64 channels score as
    one removal (issue 9).
    """

    def __init__(
        self, model: nn.Module, structures: Structures, keys: Collection[str] | None = None, *, fisher: bool = False
    ) -> None:
        """Score the sets of ``structures`` (only those whose key is in ``keys``, when given)."""
        self.fisher = fisher
        self.structures = structures
        self.sets = [s for s in structures.sets if keys is None or s.key in keys]
        mods = dict(model.named_modules())
        self.consumers: dict[str, nn.Module] = {}
        for s in self.sets:
            for sl in s.slices:
                if _scored(sl) and not sl.param.endswith(".bias"):
                    self.consumers[sl.param] = mods[sl.param.rsplit(".", 1)[0]]
        self.sums: dict[str, torch.Tensor] = {}
        self.model = model

    def accumulate(self, loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run ``loss_fn`` (a forward pass returning the loss), backpropagate, and add each channel's term.

        Returns:
            The loss (detached). The caller zeroes the gradients it does not want.
        """
        with self.recording(), torch.enable_grad():
            loss = loss_fn()
            loss.backward()
        return loss.detach()

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Record the consumer inputs of every forward pass inside the block; on exit, after the caller's
        ``backward()``, add ``|sum_tokens grad * activation|`` of each channel (LHSPG records its training steps
        this way, so the importance costs no extra forward or backward pass)."""
        acts: dict[str, torch.Tensor] = {}

        def make(name: str) -> Callable[..., None]:
            def pre(_m: nn.Module, args: tuple[Any, ...]) -> None:
                x = args[0]
                if x.requires_grad:
                    acts[name] = x
                    x.retain_grad()

            return pre

        hooks = [m.register_forward_pre_hook(make(n)) for n, m in self.consumers.items()]
        emb = cast(Any, self.model).get_input_embeddings()
        hooks.append(emb.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True)))
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
        if self.fisher:
            self._add_fisher(acts)
            return
        for name, a in acts.items():
            if a.grad is None:
                continue
            contrib = (a.grad.float() * a.detach().float()).sum(dim=tuple(range(a.dim() - 1)))  # (in,)
            self.sums[name] = self.sums.get(name, 0) + contrib.abs().cpu().double()

    def _add_fisher(self, acts: dict[str, torch.Tensor]) -> None:
        """Add ``sum_sequences (group's joint first-order term)^2`` per set, stored under ``"<set key>"``."""
        per_seq: dict[str, torch.Tensor] = {}  # consumer weight name -> (B, in): sum over tokens of grad * act
        for name, a in acts.items():
            if a.grad is not None:
                per_seq[name] = (a.grad.float() * a.detach().float()).reshape(a.shape[0], -1, a.shape[-1]).sum(1)
        for sset in self.sets:
            joint: torch.Tensor | None = None  # (B, G)
            for sl in sset.slices:
                if sl.param in per_seq and _scored(sl):
                    term = per_seq[sl.param][:, sl.index].sum(-1)
                    joint = term if joint is None else joint + term
            if joint is not None:
                self.sums[sset.key] = self.sums.get(sset.key, 0) + joint.pow(2).sum(0).cpu().double()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The accumulated sums (for checkpoints): ``{consumer weight name: (in,)}`` per channel, or with
        ``fisher`` ``{set key: (G,)}`` per group."""
        return dict(self.sums)

    def load_state_dict(self, sums: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.sums = {k: v.double() for k, v in sums.items()}

    def scores(self) -> dict[str, torch.Tensor]:
        """``{set key: (G,) scores}`` accumulated so far."""
        return {s.key: self(s) for s in self.sets}

    def __call__(self, sset: StructureSet) -> torch.Tensor:
        if self.fisher:
            return self.sums.get(sset.key, torch.zeros(sset.n_groups, dtype=torch.float64)).clone()
        sc = torch.zeros(sset.n_groups, dtype=torch.float64)
        for sl in sset.slices:
            if sl.param in self.sums and _scored(sl):
                sc += self.sums[sl.param][sl.index].sum(1)
        return sc


__all__ = [
    "Importance",
    "LoRASaliency",
    "LoraRef",
    "MagnitudeImportance",
    "TaylorImportance",
    "group_sq_norms",
    "lora_group_stats",
    "lora_refs",
    "lora_saliency_terms",
    "weighted_sum",
]
