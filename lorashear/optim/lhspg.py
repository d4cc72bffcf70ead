"""LHSPG: LoRA Half-Space Projected Gradient, progressive structured pruning (ALGORITHM.md section 3).

Only the LoRA weights ``A``, ``B`` train (AdamW); the base ``W`` is frozen except that the redundant groups are
driven to exactly zero. After ``warmup_steps`` (T_w), ``periods`` (P) periods of ``period_steps`` (T) steps follow.
At each period start, every quota cluster picks its share of the still-active, unprotected groups with the lowest
saliency (:class:`lorashear.importance.LoRASaliency`): they become *active redundant*. Shares are spread by cumulative
rounding, so a cluster with quota K removes ``floor((p+1)K/P) - floor(pK/P)`` groups in period ``p`` (a quota
smaller than P lands in the last periods).

Per step, after the AdamW update of ``A``, ``B``:

* ``decay`` [code]: the zero-slices of active redundant groups (rows of ``W``, ``B``, bias; for query heads also
  ``o_proj`` columns of ``W`` and ``A``) are multiplied by ``(T - t - 1) / (T - t)``: a linear ramp that reaches
  exactly zero at the period's last step ``t = T - 1``;
* ``hsp`` [paper intent]: trial iterate ``x = W_g + (sBA)_g - lambda_g * c_g * W_g / ||W_g||``; if
  ``<x, W_g> < eps ||W_g||^2`` the group is projected to zero (``W_g``, ``B_g``, bias), else ``W_g <- x`` with
  ``(sBA)_g`` folded in (``B`` rows / ``A`` columns reset); lambda grows by ``lambda_growth`` per step up to
  ``lambda_max`` (DHSPG's bounded growth); the period's last step forces exact zero so the count is exact.
  [ours] The brief scales the sparsity step by the learning rate; here ``c_g = ||W_g|| / T`` at selection, so
  lambda is scale-free: ``lambda = 1`` walks a group to zero in one period, larger values cross the half-space
  boundary earlier and project.

Groups already removed are re-zeroed every step. Optionally, at each period end, ``s B A`` of kept groups is
folded into ``W`` and ``B`` reset (``fold_lora_each_period``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lorashear.config import LHSPGConfig
from lorashear.errors import ExactnessError
from lorashear.graph import Structures, StructureSet
from lorashear.importance import Importance, LoRASaliency, group_sq_norms, lora_refs
from lorashear.training import clip_gradients, trainable_groups


def spread(quota: int, periods: int) -> list[int]:
    """Groups removed per period for a cluster quota, by cumulative rounding (sums to ``quota``)."""
    return [((p + 1) * quota) // periods - (p * quota) // periods for p in range(periods)]


class LHSPG:
    """The optimizer. Call :meth:`step` after ``loss.backward()``, once per optimizer step.

    Args:
        model: PEFT-wrapped model; the LoRA weights are the trainable parameters.
        structures: discovery result (with ``protected`` filled in by the analysis).
        quotas: ``{set key: {cluster id: groups to remove}}``.
        cfg: schedule, mode and AdamW settings.
        importance: scores groups at each period start, lowest removed first (default: the paper code's
            :class:`~lorashear.importance.LoRASaliency` with ``cfg.criteria``).

    Raises:
        ValueError: a quota larger than the cluster's unprotected groups.
    """

    def __init__(
        self,
        model: nn.Module,
        structures: Structures,
        quotas: dict[str, dict[int, int]],
        cfg: LHSPGConfig,
        importance: Importance | None = None,
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.sets: dict[str, StructureSet] = {k: s for k, s in structures.by_key().items() if k in quotas}
        self.quotas = quotas
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.refs = lora_refs(model)
        self.importance: Importance = importance or LoRASaliency(model, cfg.criteria)
        groups = trainable_groups(model, cfg.weight_decay)  # the LoRA, then the norms with lora.train_norms
        self.lora_params = [p for g in groups for p in g["params"]]
        self.inner = torch.optim.AdamW(groups, lr=cfg.lr)
        self.step_count = 0
        self.pruned: dict[str, set[int]] = {k: set() for k in self.sets}
        self.active: dict[str, list[int]] = {k: [] for k in self.sets}
        self.lambdas: dict[str, torch.Tensor] = {}
        self.scales: dict[str, torch.Tensor] = {}
        self.projected_early = 0  # hsp: groups the half-space projection zeroed before their period ended
        self.history: list[dict[str, Any]] = []
        for key, q in quotas.items():
            s = self.sets[key]
            for cid, k in q.items():
                free = int(((s.cluster == cid) & ~s.protected).sum())
                if k > free:
                    raise ValueError(f"{key} cluster {cid}: quota {k} exceeds {free} unprotected groups")

    # schedule -----------------------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        """Warm-up plus all periods, in optimizer steps."""
        return self.cfg.total_steps

    def phase(self, step: int) -> tuple[int, int]:
        """``(period, t)`` of a 0-based step; period -1 during warm-up."""
        s = step - self.cfg.warmup_steps
        if s < 0:
            return -1, step
        period = min(s // self.cfg.period_steps, self.cfg.periods - 1)
        return period, s - period * self.cfg.period_steps

    # main step ----------------------------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        """Clip, AdamW on the LoRA weights, then the group operations of this step.

        Returns:
            ``{"grad_norm", "groups_zero", "period"}`` for logging.

        Raises:
            DivergedError: a non-finite gradient norm (a too large ``lhspg.lr``, fp16 overflow); names the step.
        """
        period, t = self.phase(self.step_count)
        if period >= 0 and t == 0:
            self._select(period)
        norm = clip_gradients(self.lora_params, self.cfg.max_grad_norm, stage="prune", step=self.step_count)
        self.inner.step()
        with torch.no_grad():
            if period >= 0:
                T = self.cfg.period_steps
                last = t == T - 1
                for key, groups in self.active.items():
                    if not groups:
                        continue
                    if self.cfg.mode == "decay" or last:
                        factor = (T - t - 1) / (T - t)
                        self._scale(self.sets[key], groups, factor)
                    else:
                        self._hsp(key, groups)
                if last:
                    for key, active in self.active.items():
                        self.pruned[key].update(active)
                    self.active = {k: [] for k in self.sets}
                    if self.cfg.fold_lora_each_period:
                        self._fold_all()
            for key, gone in self.pruned.items():
                if gone:
                    self._scale(self.sets[key], sorted(gone), 0.0)
        self.step_count += 1
        zero = sum(len(g) for g in self.pruned.values())
        return {"grad_norm": norm, "groups_zero": float(zero), "period": float(period)}

    def _select(self, period: int) -> None:
        picked: dict[str, list[int]] = {}
        for key, q in self.quotas.items():
            s = self.sets[key]
            taken = self.pruned[key]
            want = {cid: spread(k, self.cfg.periods)[period] for cid, k in q.items()}
            if not any(want.values()):
                continue
            score = self.importance(s)
            chosen: list[int] = []
            for cid, k in want.items():
                if k == 0:
                    continue
                cand = [
                    g for g in torch.nonzero((s.cluster == cid) & ~s.protected).flatten().tolist() if g not in taken
                ]
                cand.sort(key=lambda g: (float(score[g]), g))
                chosen += cand[:k]
            picked[key] = sorted(chosen)
            self.lambdas[key] = torch.full((len(chosen),), self.cfg.lambda_init, dtype=torch.float64)
            norms = group_sq_norms(s, self.params, zero_only=True).sqrt()
            self.scales[key] = norms[sorted(chosen)] / self.cfg.period_steps
        self.active = {k: picked.get(k, []) for k in self.sets}
        self.history.append({"period": period, "step": self.step_count, "selected": picked})

    def _scale(self, s: StructureSet, groups: list[int], factor: float) -> None:
        g = torch.tensor(groups, dtype=torch.long)
        for sl in s.slices:
            if not sl.zero:
                continue
            p = self.params[sl.param]
            idx = sl.index[g].flatten().to(p.device)
            if factor == 0.0:
                p.data.index_fill_(sl.dim, idx, 0.0)
            else:
                p.data.index_copy_(sl.dim, idx, p.data.index_select(sl.dim, idx) * factor)

    def _hsp(self, key: str, groups: list[int]) -> None:
        s = self.sets[key]
        eps = self.cfg.epsilon
        lam = self.lambdas[key]
        scale = self.scales[key]
        for i, g in enumerate(groups):
            gi = torch.tensor([g])
            base = [sl for sl in s.slices if sl.zero and sl.lora is None]
            parts = [self.params[sl.param].data.index_select(sl.dim, sl.index[gi].flatten()) for sl in base]
            deltas: list[torch.Tensor | None] = []
            for sl in base:
                ref = self.refs.get(sl.param)
                idx = sl.index[gi].flatten()
                if ref is None:
                    deltas.append(None)
                elif sl.dim == 0:
                    deltas.append(ref.scaling * ref.B.data[idx] @ ref.A.data)
                else:
                    deltas.append(ref.scaling * ref.B.data @ ref.A.data[:, idx])
            norm = torch.sqrt(torch.stack([(x.float() ** 2).sum() for x in parts]).sum())
            if norm == 0:
                continue
            trial = [
                x + (d if d is not None else 0) - float(lam[i] * scale[i]) * x / norm
                for x, d in zip(parts, deltas, strict=False)
            ]
            inner = sum((x.float() * w.float()).sum() for x, w in zip(trial, parts, strict=False))
            if inner < eps * norm**2:
                self._scale(s, [g], 0.0)
                self.projected_early += 1
            else:
                for sl, x in zip(base, trial, strict=False):
                    p = self.params[sl.param]
                    p.data.index_copy_(sl.dim, sl.index[gi].flatten(), x.to(p.dtype))
                for sl in s.slices:  # the LoRA part now lives in W
                    if sl.zero and sl.lora is not None:
                        self.params[sl.param].data.index_fill_(sl.dim, sl.index[gi].flatten(), 0.0)
            lam[i] = min(float(lam[i]) * (1 + self.cfg.lambda_growth), self.cfg.lambda_max)

    def _fold_all(self) -> None:
        for wname, ref in self.refs.items():
            W = self.params[wname]
            W.data += (ref.scaling * ref.B.data.float() @ ref.A.data.float()).to(W.dtype)
            ref.B.data.zero_()

    # inspection ---------------------------------------------------------------------------------------------
    def zero_groups(self, key: str) -> list[int]:
        """Groups of a set whose zero-slices are all exactly zero now."""
        s = self.sets[key]
        ok = torch.ones(s.n_groups, dtype=torch.bool)
        for sl in s.slices:
            if not sl.zero:
                continue
            p = self.params[sl.param].detach()
            red = tuple(d for d in range(p.dim()) if d != sl.dim)
            nz = (p != 0).any(dim=red) if red else p != 0
            ok &= ~nz.cpu()[sl.index].any(dim=1)
        return torch.nonzero(ok).flatten().tolist()

    def check_period(self, period: int) -> None:
        """Check the invariant of a finished period: exactly the cumulative quota is marked removed, all zero.

        Raises:
            ExactnessError: a count or a zero check failed (a bug, never user input).
        """
        for key, q in self.quotas.items():
            expect = sum(sum(spread(k, self.cfg.periods)[: period + 1]) for k in q.values())
            pruned = self.pruned[key]
            zero = set(self.zero_groups(key))
            if len(pruned) != expect or not pruned <= zero:
                raise ExactnessError(
                    f"after period {period + 1}, {key} has {len(pruned)} groups marked removed "
                    f"(expected {expect}) and {len(pruned - zero)} of them are not exactly zero"
                )

    def removed(self) -> dict[str, list[int]]:
        """``{set key: sorted removed groups}`` (only after the last period is everything in here)."""
        return {k: sorted(v) for k, v in self.pruned.items() if v}

    # checkpointing ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step counter, pruned and active group sets, lambdas, history and the AdamW state."""
        return {
            "step": self.step_count,
            "pruned": {k: sorted(v) for k, v in self.pruned.items()},
            "active": {k: list(v) for k, v in self.active.items()},
            "lambdas": {k: v.tolist() for k, v in self.lambdas.items()},
            "scales": {k: v.tolist() for k, v in self.scales.items()},
            "history": self.history,
            "projected_early": self.projected_early,
            "inner": copy.deepcopy(self.inner.state_dict()),  # torch's load_state_dict may alias tensors
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.step_count = int(state["step"])
        self.pruned = {k: set(v) for k, v in state["pruned"].items()}
        self.active = {k: list(v) for k, v in state["active"].items()}
        self.lambdas = {k: torch.tensor(v, dtype=torch.float64) for k, v in state["lambdas"].items()}
        self.scales = {k: torch.tensor(v, dtype=torch.float64) for k, v in state.get("scales", {}).items()}
        self.history = list(state["history"])
        self.projected_early = int(state.get("projected_early", 0))
        self.inner.load_state_dict(state["inner"])
