"""The compression stage: slice the zero groups away and prove the output did not change (ALGORITHM.md section 4).

:func:`compress` takes the group-sparse model LHSPG left and the groups it zeroed, compares the logits on a probe
before and after slicing (in float64 when a copy fits, since fp32 summation order alone reached 2.6e-4 on
SmolLM2-135M), and returns a :class:`CompressionResult` with the replayable plan. :func:`apply_removed` is the
slicing alone, used to rebuild the sliced shapes when a run resumes after this stage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lorashear import per_layer
from lorashear.compression.slicing import check_exact, kept_indices, make_plan, rescale_norms_, slice_
from lorashear.errors import ExactnessError
from lorashear.graph import Structures
from lorashear.modeling import count_params

STAGE = "compress"


@dataclass
class CompressionResult:
    """What slicing did and how exact it was.

    Attributes:
        max_abs_logit_diff: max |logits(group-sparse) - logits(sliced)| on the probe.
        compared_in: dtype of that comparison (``float64`` when a copy of the model fits).
        exact: whether the difference was held to ``tolerance``; True for every job since hidden-dimension removal
            rescales RMSNorm's epsilon as well as its weight (reports from earlier versions say False for hidden).
        tolerance: the bound the difference had to meet (``None`` in earlier reports with hidden removal).
        params_after: base parameters of the sliced model.
        config: the sizes written into the config (heads, KV heads, intermediate, hidden, head_dim).
        plan: the replayable plan (``plan.json``).
    """

    max_abs_logit_diff: float
    compared_in: str
    exact: bool
    tolerance: float | None
    params_after: int
    config: dict[str, Any]
    plan: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionResult:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)

    def summary(self) -> dict[str, Any]:
        """The report's view (without the plan, which is its own artifact)."""
        return {k: v for k, v in self.to_dict().items() if k != "plan"}


def apply_removed(model: nn.Module, structures: Structures, removed: dict[str, list[int]]) -> dict[str, Any]:
    """Slice ``removed`` groups out of ``model`` in place (RMSNorm rescaled for hidden dims) and return the plan."""
    kept = kept_indices(structures, removed)
    hidden_before = structures.shape.hidden_size
    slice_(model, kept)
    cfg: Any = model.config
    norms: list[str] = []
    for s in structures.sets:
        if s.kind == "hidden_dim" and removed.get(s.key):
            norms = [sl.param for sl in s.slices if sl.role == "consumer" and sl.param in s.meta.get("norms", [])]
            rescale_norms_(model, norms, hidden_before, cfg.hidden_size)
    sizes = per_layer.layer_sizes(model)
    uniform = all(len(set(v)) == 1 for v in sizes.values())
    per_layer_sizes = None if uniform else {f"layer_{k}": v for k, v in sizes.items()}
    return make_plan(kept, cfg.to_dict(), norms=norms, hidden_before=hidden_before, layer_sizes=per_layer_sizes)


def exactness_dtype(model: nn.Module, compute: torch.dtype) -> torch.dtype:
    """float64 when a float64 copy of the weights fits comfortably (GPU: half the free memory; CPU: 8 GiB)."""
    device = next(model.parameters()).device
    need = 8 * sum(p.numel() for p in model.parameters()) * 2
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return torch.float64 if need < free // 2 else compute
    return torch.float64 if need < 8 * 2**30 else compute


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids.to(next(model.parameters()).device), use_cache=False).logits.double().cpu()


def compress(
    model: nn.Module,
    structures: Structures,
    removed: dict[str, list[int]],
    *,
    probe_ids: torch.Tensor,
    expected_params: int | None = None,
) -> CompressionResult:
    """Physically remove the zero groups and check the logits did not change.

    Args:
        model: the group-sparse (PEFT) model; sliced in place, its dtype unchanged on return.
        structures: discovery result the group indices refer to.
        removed: ``{set key: groups}`` (:attr:`~lorashear.optim.PruneResult.removed`), all exactly zero.
        probe_ids: ``(B, T)`` token ids for the exactness check.
        expected_params: the budget's parameter count after slicing; checked when given.

    Returns:
        :class:`CompressionResult`.

    Raises:
        ExactnessError: the logits changed beyond tolerance, or the parameter count is not the budget's.
    """
    compute = next(model.parameters()).dtype
    check_dtype = exactness_dtype(model, compute)
    model.to(check_dtype)
    before = _logits(model, probe_ids)
    plan = apply_removed(model, structures, removed)
    after = _logits(model, probe_ids)
    model.to(compute)  # exact round trip: every value came from the compute dtype
    tol: float
    if check_dtype == torch.float64:
        tol = 1e-4  # RMSNorm and RoPE still compute in float32 inside the float64 model
    else:
        tol = (1e-4 if check_dtype == torch.float32 else 5e-2) * max(1.0, float(before.abs().max()) / 10)
    diff = check_exact(before, after, tol=tol, what="compression")
    n = count_params(model)
    if expected_params is not None and n != expected_params:
        raise ExactnessError(f"sliced model has {n:,} parameters, the plan said {expected_params:,}")
    return CompressionResult(
        max_abs_logit_diff=diff,
        compared_in=str(check_dtype).replace("torch.", ""),
        exact=True,
        tolerance=tol,
        params_after=n,
        config=plan["config"],
        plan=plan,
    )
