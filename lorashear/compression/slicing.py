"""Slicing: remove groups from tensors, reconcile cached sizes, record and replay the pruning plan.

ALGORITHM.md section 4. Producers (rows of q/k/v/gate/up weights, ``lora_B``, biases) and consumers (columns of
o/down weights, ``lora_A``; the hidden dimension's embedding columns, norms, rows of o/down, columns of everything
reading the stream) are sliced with one index per tensor dim. Every size the model caches is then re-derived from
the weights (config, linear/embedding attributes, attention's ``num_key_value_groups``, PEFT's in/out features);
``head_dim`` is written explicitly. The plan (module, dim, kept indices) replays onto the dense model.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn

from lorashear.errors import ExactnessError
from lorashear.graph import Structures
from lorashear.modeling import base_name

PLAN_VERSION = 1


def kept_indices(structures: Structures, removed: dict[str, list[int]]) -> dict[str, dict[int, torch.Tensor]]:
    """Per parameter (traced names) and dim, the sorted indices that stay.

    Args:
        structures: discovery result.
        removed: ``{set key: [group indices removed]}``.

    Returns:
        ``{param name: {dim: LongTensor of kept indices}}``, only for tensors that lose something.
    """
    drop: dict[str, dict[int, set[int]]] = {}
    sizes: dict[str, dict[int, int]] = {}
    params = structures.shapes
    for s in structures.sets:
        groups = removed.get(s.key, [])
        if not groups:
            continue
        g = torch.tensor(sorted(groups), dtype=torch.long)
        for sl in s.slices:
            idx = sl.index[g].flatten().tolist()
            drop.setdefault(sl.param, {}).setdefault(sl.dim, set()).update(idx)
            sizes.setdefault(sl.param, {})[sl.dim] = params[sl.param][sl.dim]
    out: dict[str, dict[int, torch.Tensor]] = {}
    for name, dims in drop.items():
        for dim, gone in dims.items():
            keep = [i for i in range(sizes[name][dim]) if i not in gone]
            out.setdefault(name, {})[dim] = torch.tensor(keep, dtype=torch.long)
    return out


@torch.no_grad()
def slice_(model: nn.Module, kept: dict[str, dict[int, torch.Tensor]]) -> None:
    """Slice parameters in place (tied parameters once) and re-derive every cached size.

    Args:
        model: the model whose parameter names ``kept`` uses.
        kept: ``{param name: {dim: kept indices}}`` from :func:`kept_indices` or a plan.

    Raises:
        KeyError: a name in ``kept`` is not a parameter of ``model``.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    done: set[int] = set()
    for name, dims in kept.items():
        p = params[name]
        if id(p) in done:
            continue
        done.add(id(p))
        data = p.data
        for dim, idx in sorted(dims.items()):
            data = data.index_select(dim, idx.to(data.device)).contiguous()
        p.data = data
        if p.grad is not None:
            p.grad = None
    reconcile_(model)


def reconcile_(model: nn.Module) -> None:
    """Re-derive module attributes and config sizes from the (sliced) weights.

    Sets ``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``, ``hidden_size`` and an explicit
    ``head_dim`` in the config; ``in_features``/``out_features`` of linears (and PEFT LoRA layers),
    ``embedding_dim``; ``num_key_value_groups`` of attention modules; cached ``hidden_size`` /
    ``intermediate_size`` of MLPs.
    """
    cfg: Any = model.config
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    mod: Any
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, nn.Embedding):
            mod.embedding_dim = mod.weight.shape[1]
    for mod in model.modules():
        base = getattr(mod, "base_layer", None)
        if isinstance(base, nn.Linear) and hasattr(mod, "in_features"):
            mod.in_features, mod.out_features = base.in_features, base.out_features
    attn: list[Any] = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj")]
    mlps: list[Any] = [m for m in model.modules() if hasattr(m, "gate_proj") and hasattr(m, "down_proj")]
    emb = cast(Any, model).get_input_embeddings()
    if attn:
        m: Any
        q, k = _linear(attn[0].q_proj), _linear(attn[0].k_proj)
        cfg.num_attention_heads = q.out_features // head_dim
        cfg.num_key_value_heads = k.out_features // head_dim
        for m in attn:
            m.num_key_value_groups = _linear(m.q_proj).out_features // _linear(m.k_proj).out_features
            m.head_dim = head_dim
    cfg.hidden_size = emb.weight.shape[1]
    cfg.head_dim = head_dim
    if mlps:
        cfg.intermediate_size = _linear(mlps[0].gate_proj).out_features
    for m in model.modules():  # sizes some modules cache at construction
        if m in mlps and hasattr(m, "intermediate_size"):
            m.intermediate_size = _linear(m.gate_proj).out_features
        if isinstance(getattr(m, "hidden_size", None), int):
            m.hidden_size = cfg.hidden_size


def _linear(mod: nn.Module) -> nn.Linear:
    base = getattr(mod, "base_layer", mod)
    assert isinstance(base, nn.Linear)
    return base


@torch.no_grad()
def rescale_norms_(model: nn.Module, norm_params: list[str], before: int, after: int) -> None:
    """Make RMSNorm over ``after`` hidden dims compute what it computed over ``before`` (ALGORITHM.md section 4).

    The removed dims are zero in the residual stream, so the sum of squares is unchanged while the mean is now
    taken over ``after`` dims: ``mean' = mean * before / after``. Multiplying each norm's weight by
    ``sqrt(before / after)`` and its epsilon by ``before / after`` gives
    ``w' x / sqrt(mean' + eps') = w x / sqrt(mean + eps)`` exactly, so hidden-dimension removal is exact (not only
    close, as the brief's weight-only rescale leaves it). The epsilon goes into every rescaled norm module and into
    the config's ``rms_norm_eps``, which the export writes (all of a LLaMA-family model's RMSNorms act on the
    hidden dimension and share that value).

    Args:
        model: the sliced model (PEFT-wrapped or plain); changed in place.
        norm_params: names of the RMSNorm weights, ``(hidden,)`` each.
        before: hidden width before slicing.
        after: hidden width after slicing.
    """
    if before == after:
        return
    scale = before / after
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in norm_params:
        params[name].mul_(math.sqrt(scale))
        module = model.get_submodule(name.rsplit(".", 1)[0])
        for attr in ("variance_epsilon", "eps"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, getattr(module, attr) * scale)
    cfg: Any = getattr(model, "config", None)
    if cfg is not None and isinstance(getattr(cfg, "rms_norm_eps", None), float):
        cfg.rms_norm_eps = cfg.rms_norm_eps * scale


def make_plan(
    kept: dict[str, dict[int, torch.Tensor]],
    config: dict[str, Any],
    *,
    norms: list[str],
    hidden_before: int,
    layer_sizes: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """Replayable plan (JSON): base-model tensor names, dims and kept indices, plus the resulting config sizes.

    LoRA tensors are left out: the plan describes the base model. Tied tensors appear under each name. A per-layer
    layout adds ``layer_num_attention_heads`` / ``layer_num_key_value_heads`` / ``layer_intermediate_size`` (one
    entry per layer) to ``config``.
    """
    tensors = []
    for name, dims in sorted(kept.items()):
        if ".lora_A." in name or ".lora_B." in name:
            continue
        for dim, idx in sorted(dims.items()):
            tensors.append({"name": base_name(name), "dim": dim, "kept": idx.tolist()})
    sizes = {
        k: config[k]
        for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "hidden_size", "head_dim")
        if k in config
    }
    return {
        "version": PLAN_VERSION,
        "config": sizes | {k: v for k, v in (layer_sizes or {}).items()},
        "norm_rescale": {"params": [base_name(n) for n in norms], "hidden_before": hidden_before},
        "tensors": tensors,
    }


def apply_plan(model: nn.Module, plan: dict[str, Any]) -> nn.Module:
    """Replay a plan on a dense (plain, non-PEFT) model of the same architecture, in place.

    Raises:
        ValueError: unknown plan version, or a tensor name the model lacks.
    """
    if plan.get("version") != PLAN_VERSION:
        raise ValueError(f"unsupported plan version {plan.get('version')!r}")
    params = dict(model.named_parameters(remove_duplicate=False))
    kept: dict[str, dict[int, torch.Tensor]] = {}
    for t in plan["tensors"]:
        if t["name"] not in params:
            raise ValueError(f"plan names tensor {t['name']!r}, which the model lacks")
        kept.setdefault(t["name"], {})[int(t["dim"])] = torch.tensor(t["kept"], dtype=torch.long)
    slice_(model, kept)
    hidden_after = cast(Any, model).get_input_embeddings().weight.shape[1]
    rescale_norms_(model, plan["norm_rescale"]["params"], plan["norm_rescale"]["hidden_before"], hidden_after)
    return model


@torch.no_grad()
def check_exact(before: torch.Tensor, after: torch.Tensor, *, tol: float, what: str) -> float:
    """Max abs difference of two logit tensors; raises if above ``tol``.

    Raises:
        ExactnessError: the sliced model's logits differ from the group-sparse model's.
    """
    diff = float((before.float() - after.float()).abs().max())
    if not math.isfinite(diff) or diff > tol:
        raise ExactnessError(f"{what}: sliced logits differ from the group-sparse logits by {diff:.3g} > {tol:g}")
    return diff
