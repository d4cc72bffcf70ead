"""One-shot group pruning baselines, for side-by-side comparisons with LHSPG (issue 9).

Our own implementations of the criteria the field compares against, on the same structures and the same parameter
budget as the pipeline, so a benchmark row differs from ours only in how groups are chosen:

* ``taylor`` - first-order Taylor importance of each group's output on calibration text (LLM-Pruner's
  element-wise first-order criterion summed over a group's output channels, here on the activations that the group
  feeds, :class:`~lorashear.importance.TaylorImportance`);
* ``magnitude`` - the L2 norm of each group's weights;
* ``random`` - a seeded random order.

:func:`one_shot` picks, per quota cluster, the lowest-scoring unprotected groups in one go and zeroes them (producers
and, for query heads, consumers: exactly what LHSPG leaves), so :func:`~lorashear.compression.compress` slices them
with the same exactness check.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from lorashear.evaluation.loss import lm_loss
from lorashear.graph import Structures
from lorashear.importance import Importance, MagnitudeImportance, TaylorImportance

CRITERIA: dict[str, Callable[[nn.Module, Structures, list[dict[str, torch.Tensor]], int], Importance]] = {}
"""One-shot criteria by name: ``(model, structures, calibration batches, seed) -> importance``."""


def _taylor(model: nn.Module, structures: Structures, batches: list[dict[str, torch.Tensor]], _seed: int) -> Importance:
    taylor = TaylorImportance(model, structures)
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    for b in batches:
        x = b["input_ids"].to(device)
        taylor.accumulate(functools.partial(lm_loss, model, x))
        model.zero_grad(set_to_none=True)
    model.train(was)
    return taylor


def _magnitude(model: nn.Module, _st: Structures, _b: list[dict[str, torch.Tensor]], _seed: int) -> Importance:
    return MagnitudeImportance(dict(model.named_parameters(remove_duplicate=False)))


def _random(_model: nn.Module, _st: Structures, _b: list[dict[str, torch.Tensor]], seed: int) -> Importance:
    gen = torch.Generator().manual_seed(seed)
    return lambda s: torch.rand(s.n_groups, generator=gen, dtype=torch.float64)


CRITERIA.update(taylor=_taylor, magnitude=_magnitude, random=_random)


@torch.no_grad()
def zero_groups_(model: nn.Module, structures: Structures, removed: dict[str, list[int]]) -> None:
    """Set the zero-slices (producers; query heads' consumers too) of ``removed`` groups to exactly zero."""
    params = dict(model.named_parameters(remove_duplicate=False))
    sets = structures.by_key()
    for key, groups in removed.items():
        g = torch.tensor(sorted(groups), dtype=torch.long)
        for sl in sets[key].slices:
            if sl.zero:
                p = params[sl.param]
                p.data.index_fill_(sl.dim, sl.index[g].flatten().to(p.device), 0.0)


def one_shot(
    model: nn.Module,
    structures: Structures,
    quotas: dict[str, dict[int, int]],
    criterion: str,
    batches: list[dict[str, torch.Tensor]],
    *,
    seed: int = 0,
) -> dict[str, list[int]]:
    """Choose and zero every quota's groups at once by ``criterion``.

    Args:
        model: the (PEFT-wrapped) model; the chosen groups end exactly zero.
        structures: discovery result (``protected`` groups are never chosen).
        quotas: ``{set key: {cluster id: groups to remove}}`` (:func:`~lorashear.optim.set_quotas`).
        criterion: ``taylor``, ``magnitude`` or ``random``.
        batches: calibration batches (``input_ids`` ``(B, T)``); only ``taylor`` reads them.
        seed: seed of ``random``.

    Returns:
        ``{set key: sorted removed groups}`` (:attr:`~lorashear.optim.PruneResult.removed`'s form).

    Raises:
        ValueError: an unknown criterion, or a quota larger than a cluster's unprotected groups.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown one-shot criterion {criterion!r}; known: {', '.join(CRITERIA)}")
    score = CRITERIA[criterion](model, structures, batches, seed)
    sets = structures.by_key()
    removed: dict[str, list[int]] = {}
    for key, q in quotas.items():
        s = sets[key]
        sc = score(s)
        chosen: list[int] = []
        for cid, k in q.items():
            cand = torch.nonzero((s.cluster == cid) & ~s.protected).flatten().tolist()
            if k > len(cand):
                raise ValueError(f"{key} cluster {cid}: quota {k} exceeds {len(cand)} unprotected groups")
            cand.sort(key=lambda g: (float(sc[g]), g))
            chosen += cand[:k]
        removed[key] = sorted(chosen)
    zero_groups_(model, structures, removed)
    return removed
