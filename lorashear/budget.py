"""Parameter budget: turn "remove X% of the parameters" into per-type quotas (standard library only).

ALGORITHM.md section 1 ("Parameter arithmetic"): a target ratio must become per-type quotas (KV groups or heads,
query heads per KV group, MLP channels, hidden dimensions) through a parameter budget, never one group-count ratio.
The uniform layout keeps the same widths in every layer, so a quota is "remove k units of this type from every
layer" and one step of the budget is one unit in every layer.

The same arithmetic serves the API's pre-flight (shape read from ``config.json``) and the pipeline (shape checked
against the traced model), so a target rejected by one is rejected by the other.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from lorashear.config import StructureConfig
from lorashear.errors import TargetNotExpressibleError, UnsupportedModelError
from lorashear.families import get_family


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a LLaMA-family decoder, from its ``config.json`` (or the traced model)."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (1 for MHA)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelShape:
        """Read sizes from a parsed ``config.json``.

        Raises:
            UnsupportedModelError: unknown ``model_type``, missing sizes, or heads not divisible by KV heads.
        """
        model_type = cfg.get("model_type")
        family = get_family(model_type)
        text = cfg.get("text_config")
        if isinstance(text, dict):  # pragma: no cover - multimodal wrappers are not LLaMA-family here
            cfg = {**cfg, **text}
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            kv = int(cfg.get("num_key_value_heads") or heads)
            head_dim = int(cfg.get("head_dim") or hidden // heads)
            shape = cls(
                model_type=family.model_type,
                num_layers=int(cfg["num_hidden_layers"]),
                hidden_size=hidden,
                num_heads=heads,
                num_kv_heads=kv,
                head_dim=head_dim,
                intermediate_size=int(cfg["intermediate_size"]),
                vocab_size=int(cfg["vocab_size"]),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=family.qkv_bias(cfg),
                o_bias=family.o_bias(cfg),
                mlp_bias=family.mlp_bias(cfg),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UnsupportedModelError(f"config.json lacks a readable size: {exc}", field="model") from None
        if shape.num_heads % shape.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}", field="model"
            )
        return shape

    def param_count(self, kv_heads: int, n_rep: int, intermediate: int, hidden: int) -> int:
        """Exact parameter count of the uniform model with the given widths (LoRA excluded).

        Args:
            kv_heads: KV heads per layer kept.
            n_rep: query heads per KV head kept.
            intermediate: MLP channels per layer kept.
            hidden: hidden dimensions kept.
        """
        hd, h = self.head_dim, hidden
        q = kv_heads * n_rep * hd
        kvw = kv_heads * hd
        attn = h * q + 2 * h * kvw + q * h
        attn += (q + 2 * kvw) * self.qkv_bias + h * self.o_bias
        mlp = 3 * h * intermediate + (2 * intermediate + h) * self.mlp_bias
        layer = 2 * h + attn + mlp
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return embed + h + self.num_layers * layer

    @property
    def total_params(self) -> int:
        """Parameter count of the dense model."""
        return self.param_count(self.num_kv_heads, self.n_rep, self.intermediate_size, self.hidden_size)


@dataclass(frozen=True)
class Quotas:
    """Units removed from every layer (uniform layout) and the resulting sizes.

    Attributes:
        kv_groups: KV groups (heads, for MHA) removed per layer.
        query_heads_per_group: query heads removed from each surviving KV group (GQA only).
        channels: MLP intermediate channels removed per layer.
        hidden: hidden dimensions removed (model-wide).
        params_before / params_after / params_target: parameter counts.
        tolerance: half of the finest budget step (one unit in every layer), in parameters.
    """

    kv_groups: int
    query_heads_per_group: int
    channels: int
    hidden: int
    params_before: int
    params_after: int
    params_target: int
    tolerance: int
    kept: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    def describe(self) -> str:
        """One line: what every layer loses."""
        return (
            f"quotas per layer: {self.kv_groups} KV groups, {self.query_heads_per_group} query heads per group, "
            f"{self.channels} channels, {self.hidden} hidden dims"
        )


def estimate_peak_bytes(shape: ModelShape, elt_bytes: int, lora_params: int, batch: int, seq: int) -> int:
    """Rough peak memory of training with LoRA, bytes (ALGORITHM.md section 7: estimate before starting).

    Frozen weights at ``elt_bytes`` per value; LoRA weights, gradients and two AdamW moments in fp32; activations
    kept for the backward pass (per layer about 12 hidden-sized and 4 intermediate-sized tensors per token, plus
    attention scores) and fp32 logits with their gradient. The pre-flight (before queueing) and the load stage (on
    the worker, with the real LoRA size and dtype) both use it.
    """
    tokens = batch * seq
    per_layer = tokens * (12 * shape.hidden_size + 4 * shape.intermediate_size) * elt_bytes
    per_layer += batch * shape.num_heads * seq * seq * elt_bytes
    logits = tokens * shape.vocab_size * 4 * 3
    return int(shape.total_params * elt_bytes + lora_params * 4 * 4 + shape.num_layers * per_layer + logits)


def _protected(n: int, gamma: float) -> int:
    """Units per layer that the unprunable ratio gamma protects (at least one unit always stays)."""
    return max(1, math.ceil(gamma * n - 1e-9)) if gamma > 0 else 1


def plan_quotas(shape: ModelShape, target_ratio: float, structures: StructureConfig, gamma: float) -> Quotas:
    """Choose per-layer quotas whose parameter count is nearest ``target_ratio`` of removal.

    Among the attention options allowed by ``structures.attention_unit`` and gamma, and hidden widths that are
    multiples of ``structures.hidden_multiple``, MLP channels (multiples of ``structures.channel_multiple``) fill
    the remaining budget. Ties on the count are broken by the balance rule: the same removed fraction of attention
    and MLP parameters, or ``structures.attention_share`` of the removed parameters from attention.

    Raises:
        TargetNotExpressibleError: no combination comes within one budget step of the target (e.g. a ratio above
            what gamma leaves prunable); the message gives the numbers.
    """
    s = shape
    before = s.total_params
    target_removed = target_ratio * before
    target_after = round(before - target_removed)
    rep = s.n_rep

    # attention options (kv groups removed, query heads removed per kept group)
    attn_opts = [(0, 0)]
    if structures.attention:
        kv_max = s.num_kv_heads - _protected(s.num_kv_heads, gamma)
        q_max = rep - _protected(rep, gamma) if rep > 1 else 0
        unit = structures.attention_unit
        divisible_heads = get_family(s.model_type).needs_divisible_heads(s.qkv_bias or s.o_bias or s.mlp_bias)
        attn_opts = []
        for kv_rm in range(kv_max + 1):
            for q_rm in range(q_max + 1):
                if unit == "kv_group" and q_rm:
                    continue
                if unit == "query_head" and rep > 1 and kv_rm:
                    continue
                heads = (s.num_kv_heads - kv_rm) * (rep - q_rm)
                if divisible_heads and s.hidden_size % heads:
                    continue  # the stock config class needs heads | hidden (lorashear.families)
                attn_opts.append((kv_rm, q_rm))
    m = structures.channel_multiple
    inter = s.intermediate_size
    c_kept_min = _protected(inter, gamma)
    if structures.mlp:
        c_opts = sorted({k for k in range(inter, c_kept_min - 1, -1) if k % m == 0 or k == inter})
    else:
        c_opts = [inter]
    hm = structures.hidden_multiple
    if structures.hidden:
        h_min = _protected(s.hidden_size, gamma)
        h_opts = [h for h in range(s.hidden_size, h_min - 1, -1) if h % hm == 0 or h == s.hidden_size]
    else:
        h_opts = [s.hidden_size]

    # finest step: one unit in every layer of the finest enabled type
    steps = []
    if structures.mlp:
        steps.append(s.num_layers * m * (3 * s.hidden_size + 2 * s.mlp_bias))
    if structures.attention:
        q_cost = (2 * s.head_dim * s.hidden_size + s.head_dim * s.qkv_bias) * s.num_kv_heads
        kv_cost = (2 * rep + 2) * s.head_dim * s.hidden_size
        steps.append(s.num_layers * (q_cost if rep > 1 and structures.attention_unit != "kv_group" else kv_cost))
    if structures.hidden:
        steps.append(before // s.hidden_size * hm)
    tolerance = max(1, min(steps) // 2)

    attn_params = s.num_layers * (
        s.param_count(s.num_kv_heads, rep, 0, s.hidden_size) - s.param_count(0, rep, 0, s.hidden_size)
    )
    mlp_params = s.num_layers * 3 * s.hidden_size * inter
    best: tuple[float, float, tuple[int, int, int, int]] | None = None
    for h in h_opts:
        for kv_rm, q_rm in attn_opts:
            kv_kept, rep_kept = s.num_kv_heads - kv_rm, rep - q_rm
            base = s.param_count(kv_kept, rep_kept, 0, h)
            per_channel = s.param_count(kv_kept, rep_kept, 1, h) - base
            # channels that bring the count nearest the target, then the neighbours in the option list
            ideal = (target_after - base) / per_channel if per_channel else inter
            cands = sorted(c_opts, key=lambda c: abs(c - ideal))[:2]
            for c in cands:
                after = s.param_count(kv_kept, rep_kept, c, h)
                err = abs(after - target_after)
                removed = before - after
                a_rm = attn_params - s.num_layers * (
                    s.param_count(kv_kept, rep_kept, 0, s.hidden_size) - s.param_count(0, rep_kept, 0, s.hidden_size)
                )
                fa = a_rm / attn_params if attn_params else 0.0
                fm = (inter - c) / inter if mlp_params else 0.0
                fh = (s.hidden_size - h) / s.hidden_size
                if structures.attention_share is not None and removed > 0:
                    balance = (a_rm / removed - structures.attention_share) ** 2
                else:
                    enabled = [f for f, on in ((fa, structures.attention), (fm, structures.mlp)) if on]
                    mean = sum(enabled) / len(enabled) if enabled else 0.0
                    balance = sum((f - mean) ** 2 for f in enabled)
                    if structures.hidden:
                        balance += (fh - mean) ** 2
                key = (max(err - tolerance, 0), balance)
                cand = (key[0], key[1], (kv_rm, q_rm, inter - c, s.hidden_size - h))
                if best is None or cand[:2] < best[:2]:
                    best = cand
    assert best is not None
    kv_rm, q_rm, c_rm, h_rm = best[2]
    kv_kept, rep_kept = s.num_kv_heads - kv_rm, rep - q_rm
    after = s.param_count(kv_kept, rep_kept, inter - c_rm, s.hidden_size - h_rm)
    if abs(after - target_after) > tolerance:
        raise TargetNotExpressibleError(
            f"target_ratio={target_ratio} asks for {before - target_after:,} of {before:,} parameters removed, but the "
            f"closest reachable is {before - after:,} ({(before - after) / before:.1%}) with "
            f"attention={structures.attention}, mlp={structures.mlp}, hidden={structures.hidden}, "
            f"attention_unit={structures.attention_unit}, channel_multiple={m}, gamma={gamma} "
            f"(heads {s.num_heads}, KV heads {s.num_kv_heads}, intermediate {inter}, layers {s.num_layers})",
            field="target_ratio",
        )
    return Quotas(
        kv_groups=kv_rm,
        query_heads_per_group=q_rm,
        channels=c_rm,
        hidden=h_rm,
        params_before=before,
        params_after=after,
        params_target=target_after,
        tolerance=tolerance,
        kept={
            "num_key_value_heads": kv_kept,
            "num_attention_heads": kv_kept * rep_kept,
            "intermediate_size": inter - c_rm,
            "hidden_size": s.hidden_size - h_rm,
            "head_dim": s.head_dim,
        },
    )
