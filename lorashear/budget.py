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
from dataclasses import asdict, dataclass, replace
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
class LayerQuota:
    """Units one decoder layer loses in the per-layer layout.

    Attributes:
        layer: decoder layer index.
        kv_groups: KV groups (heads, for MHA) removed.
        query_heads_per_group: query heads removed from each surviving KV group (GQA only).
        channels: MLP intermediate channels removed.
    """

    layer: int
    kv_groups: int
    query_heads_per_group: int
    channels: int


@dataclass(frozen=True)
class Quotas:
    """Units removed from every layer (uniform layout) or from each layer (``layers``) and the resulting sizes.

    Attributes:
        kv_groups: KV groups (heads, for MHA) removed per layer.
        query_heads_per_group: query heads removed from each surviving KV group (GQA only).
        channels: MLP intermediate channels removed per layer.
        hidden: hidden dimensions removed (model-wide).
        params_before / params_after / params_target: parameter counts.
        tolerance: half of the finest budget step (one unit in every layer), in parameters.
        kept: resulting sizes; in the per-layer layout the per-layer sizes are lists (one entry per layer).
        layers: per-layer layout only: what each layer loses (the uniform fields then hold the largest quota).
    """

    kv_groups: int
    query_heads_per_group: int
    channels: int
    hidden: int
    params_before: int
    params_after: int
    params_target: int
    tolerance: int
    kept: dict[str, Any]
    layers: tuple[LayerQuota, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Quotas:
        """Inverse of :meth:`to_dict`."""
        layers = tuple(LayerQuota(**q) for q in data.get("layers", ()))
        return cls(**{**data, "layers": layers})

    def for_layer(self, layer: int | None) -> LayerQuota:
        """What ``layer`` loses (the uniform quota when there is no per-layer plan or ``layer`` is None)."""
        if self.layers and layer is not None:
            return self.layers[layer]
        return LayerQuota(-1 if layer is None else layer, self.kv_groups, self.query_heads_per_group, self.channels)

    def describe(self) -> str:
        """One line: what every layer loses."""
        if self.layers:
            heads, inter = self.kept["num_attention_heads"], self.kept["intermediate_size"]
            return (
                f"per-layer quotas: attention heads kept {min(heads)}-{max(heads)} (total {sum(heads)}), MLP channels "
                f"kept {min(inter)}-{max(inter)} (total {sum(inter)})"
            )
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
    if structures.hidden and structures.hidden_fraction is not None:
        h_opts = [_hidden_kept(s, structures, gamma)]
        _check_hidden_share(s, h_opts[0], target_ratio, structures)
    elif structures.hidden:
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


def _hidden_kept(s: ModelShape, structures: StructureConfig, gamma: float) -> int:
    """Hidden width kept for a fixed ``structures.hidden_fraction``: rounded to ``hidden_multiple``, at least what
    gamma protects."""
    assert structures.hidden_fraction is not None
    hm = structures.hidden_multiple
    want = s.hidden_size * (1 - structures.hidden_fraction)
    kept = s.hidden_size if structures.hidden_fraction == 0 else max(hm, int(round(want / hm)) * hm)
    return max(min(kept, s.hidden_size), _protected(s.hidden_size, gamma))


def _check_hidden_share(s: ModelShape, hidden_kept: int, target_ratio: float, structures: StructureConfig) -> None:
    """Refuse a fixed hidden fraction that alone removes more than ``target_ratio`` of the parameters.

    Raises:
        TargetNotExpressibleError: on ``structures.hidden_fraction``, with both figures.
    """
    before = s.total_params
    narrow = s.param_count(s.num_kv_heads, s.n_rep, s.intermediate_size, hidden_kept)
    if narrow < round(before - target_ratio * before):
        raise TargetNotExpressibleError(
            f"target_ratio={target_ratio}: structures.hidden_fraction={structures.hidden_fraction} alone removes "
            f"{(before - narrow) / before:.1%} of the parameters, more than the target",
            field="structures.hidden_fraction",
        )


def _attn_params(s: ModelShape, kv: int, rep: int) -> int:
    """Attention parameters of one layer with ``kv`` KV heads of ``rep`` query heads each (biases included)."""
    q, kvw, h = kv * rep * s.head_dim, kv * s.head_dim, s.hidden_size
    return 2 * h * q + 2 * h * kvw + (q + 2 * kvw) * s.qkv_bias


def _mlp_params(s: ModelShape, channels: int) -> int:
    """MLP parameters of one layer with ``channels`` intermediate channels (biases included)."""
    return 3 * s.hidden_size * channels + 2 * channels * s.mlp_bias


def plan_layer_quotas(
    shape: ModelShape,
    target_ratio: float,
    structures: StructureConfig,
    gamma: float,
    layer_map: list[dict[str, Any]],
) -> Quotas:
    """Per-layer quotas: each layer node group loses what the knowledge-distribution analysis says it can spare.

    Issue 9 ("the knowledge-distribution analysis decides nothing today"); the paper's section 3.2 ranks layers by
    the same measurement. Model: removing the fraction ``r`` of node group ``g`` (attention or MLP of one layer, with
    ``P`` parameters) raises the loss by ``d * (r / a) ** 2``, where ``d`` is the deviation the analysis measured with
    the fraction ``a`` ablated (``layer_map``). Minimising the summed loss rise for a parameter budget gives
    ``r = c * P * a**2 / d``; ``structures.sensitivity_exponent`` (``e``) tempers it to ``r = c * (P a^2 / d) ** e``,
    capped by what gamma leaves prunable, with ``c`` found by bisection. The fractions are then rounded to whole
    KV groups / query heads (attention, carrying the rounding error from layer to layer) and channel multiples
    (MLP, which absorb the remainder so the total lands within half a channel step of the target).

    With ``structures.hidden`` the hidden dimension (model-wide) first loses ``structures.hidden_fraction`` of its
    width everywhere (embedding, norms, every projection); the layers' heads and channels then give the rest of the
    budget, counted at the narrower width.

    Args:
        shape: the dense model's sizes.
        target_ratio: fraction 0-1 of the parameters to remove.
        structures: enabled kinds, attention unit, channel multiple, exponent, hidden fraction.
        gamma: unprunable ratio (fraction of each set's groups that stays).
        layer_map: :attr:`~lorashear.analysis.Analysis.layer_map` rows (``layer``, ``node_group``,
            ``ablated_groups``, ``deviation`` in nats).

    Returns:
        :class:`Quotas` with ``layers`` set and per-layer ``kept`` lists.

    Raises:
        TargetNotExpressibleError: the target is beyond what gamma leaves prunable.
    """
    before = shape.total_params
    target_after = round(before - target_ratio * before)
    hidden_kept = shape.hidden_size
    if structures.hidden:  # StructureConfig's validation makes per_layer + hidden give hidden_fraction
        hidden_kept = _hidden_kept(shape, structures, gamma)
        _check_hidden_share(shape, hidden_kept, target_ratio, structures)
    # every count below is at the kept hidden width; ``before`` stays the dense model's
    s = replace(shape, hidden_size=hidden_kept)
    rep = s.n_rep
    inter = s.intermediate_size
    m = structures.channel_multiple
    narrow = s.total_params
    fixed = narrow - s.num_layers * (_attn_params(s, s.num_kv_heads, rep) + _mlp_params(s, inter))
    budget = narrow - target_after  # parameters to remove from the layers' heads and channels

    # attention options of one layer: (kv removed, query heads removed per kept group) -> params removed
    attn_opts: list[tuple[int, int]] = [(0, 0)]
    if structures.attention:
        kv_max = s.num_kv_heads - _protected(s.num_kv_heads, gamma)
        q_max = rep - _protected(rep, gamma) if rep > 1 else 0
        unit = structures.attention_unit
        attn_opts = [
            (kv, q)
            for kv in range(kv_max + 1)
            for q in range(q_max + 1)
            if not (unit == "kv_group" and q) and not (unit == "query_head" and rep > 1 and kv)
        ]
    p_attn = _attn_params(s, s.num_kv_heads, rep)
    p_mlp = _mlp_params(s, inter)
    attn_removed = {o: p_attn - _attn_params(s, s.num_kv_heads - o[0], rep - o[1]) for o in attn_opts}
    attn_cap = max(attn_removed.values()) / p_attn
    c_max = inter - _protected(inter, gamma) if structures.mlp else 0
    c_max -= c_max % m if (inter - c_max) % m else 0
    mlp_cap = c_max / inter

    # the continuous allocation
    dev: dict[tuple[int, str], tuple[float, float]] = {}
    for row in layer_map:
        n = s.num_kv_heads if row["node_group"] == "attention" else inter
        a = min(1.0, max(1e-6, row["ablated_groups"] / n))
        dev[(int(row["layer"]), row["node_group"])] = (max(float(row["deviation"]), 1e-4), a)
    e = structures.sensitivity_exponent
    groups: list[tuple[int, str, int, float, float]] = []  # layer, node group, params, weight, cap
    for layer in range(s.num_layers):
        for g, p, cap, on in (
            ("attention", p_attn, attn_cap, structures.attention),
            ("mlp", p_mlp, mlp_cap, structures.mlp),
        ):
            if not on or cap <= 0:
                continue
            d, a = dev.get((layer, g), (1.0, 0.5))
            groups.append((layer, g, p, (p * a * a / d) ** e, cap))
    if not groups or sum(p * cap for _l, _g, p, _w, cap in groups) < budget:
        raise TargetNotExpressibleError(
            f"target_ratio={target_ratio} asks for {budget:,} of {before:,} parameters removed, more than "
            f"gamma={gamma} leaves prunable in the per-layer layout",
            field="target_ratio",
        )

    def allocate(attn_scale: float) -> dict[tuple[int, str], float]:
        """Removed fraction per node group meeting the budget, attention weights scaled by ``attn_scale``."""
        ws = [(lay, g, p, w * (attn_scale if g == "attention" else 1.0), cap) for lay, g, p, w, cap in groups]
        wmax = max(w for *_x, w, _c in ws)
        lo, hi = 0.0, 1.0 / (min(w for *_x, w, _c in ws) / wmax) * 2
        for _ in range(200):  # bisection on c (in units of 1 / wmax)
            mid = (lo + hi) / 2
            got = sum(p * min(cap, mid * w / wmax) for _l, _g, p, w, cap in ws)
            lo, hi = (mid, hi) if got < budget else (lo, mid)
        return {(lay, g): min(cap, hi * w / wmax) for lay, g, _p, w, cap in ws}

    frac = allocate(1.0)
    share = structures.attention_share
    if share is not None and structures.attention and structures.mlp:
        # scale the attention weights until attention gives ``share`` of the removed parameters (monotone in the
        # scale; bisection on its logarithm)
        def attn_part(f: dict[tuple[int, str], float]) -> float:
            return sum(v * p_attn for (_l, g), v in f.items() if g == "attention") / budget

        lo_s, hi_s = -30.0, 30.0
        for _ in range(100):
            mid = (lo_s + hi_s) / 2
            lo_s, hi_s = (mid, hi_s) if attn_part(allocate(math.exp(mid))) < share else (lo_s, mid)
        frac = allocate(math.exp(hi_s))
        if abs(attn_part(frac) - share) > 0.01:
            reach = f"{attn_part(allocate(math.exp(-30))):.3f}-{attn_part(allocate(math.exp(30))):.3f}"
            raise TargetNotExpressibleError(
                f"structures.attention_share={share}: at target_ratio={target_ratio} attention can give only "
                f"{reach} of the removed parameters (gamma={gamma})",
                field="structures.attention_share",
            )

    # rounding: attention to whole options (error carried forward), MLP absorbs the rest
    kv_rm = [0] * s.num_layers
    q_rm = [0] * s.num_layers
    carry = 0.0
    for layer in range(s.num_layers):
        want = frac.get((layer, "attention"), 0.0) * p_attn + carry
        best = min(attn_opts, key=lambda o: (abs(attn_removed[o] - want), o))
        kv_rm[layer], q_rm[layer] = best
        carry = want - attn_removed[best]
    left = budget - sum(attn_removed[(kv_rm[i], q_rm[i])] for i in range(s.num_layers))
    per_channel = 3 * s.hidden_size + 2 * s.mlp_bias
    ch = [0] * s.num_layers
    if structures.mlp:
        want_total = sum(frac.get((i, "mlp"), 0.0) for i in range(s.num_layers))
        carry = 0.0
        for layer in range(s.num_layers):
            share = frac.get((layer, "mlp"), 0.0) / want_total if want_total else 1.0 / s.num_layers
            want = share * left / per_channel + carry
            c = min(c_max, max(0, int(round(want / m)) * m))
            ch[layer] = c
            carry = want - c
        # settle the remainder one channel step at a time, on the layers with the most room
        for _ in range(s.num_layers * (inter // m + 1)):
            after = narrow - sum(attn_removed[(kv_rm[i], q_rm[i])] for i in range(s.num_layers))
            after -= sum(ch) * per_channel
            if abs(after - target_after) <= m * per_channel / 2:
                break
            grow = after > target_after
            order = sorted(
                range(s.num_layers), key=lambda i: -frac.get((i, "mlp"), 0.0) if grow else frac.get((i, "mlp"), 0.0)
            )
            for i in order:
                if (grow and ch[i] + m <= c_max) or (not grow and ch[i] >= m):
                    ch[i] += m if grow else -m
                    break
            else:
                break
    layers = tuple(LayerQuota(i, kv_rm[i], q_rm[i], ch[i]) for i in range(s.num_layers))
    after = fixed + sum(
        _attn_params(s, s.num_kv_heads - q.kv_groups, rep - q.query_heads_per_group)
        + _mlp_params(s, inter - q.channels)
        for q in layers
    )
    steps = [v for v in attn_removed.values() if v > 0]
    tolerance = max(1, (m * per_channel if structures.mlp else min(steps, default=2)) // 2)
    if abs(after - target_after) > tolerance:
        raise TargetNotExpressibleError(
            f"target_ratio={target_ratio}: the per-layer plan reaches {(before - after) / before:.1%} removed "
            f"(channel_multiple={m}, gamma={gamma})",
            field="target_ratio",
        )
    heads = [(s.num_kv_heads - q.kv_groups) * (rep - q.query_heads_per_group) for q in layers]
    return Quotas(
        kv_groups=max(q.kv_groups for q in layers),
        query_heads_per_group=max(q.query_heads_per_group for q in layers),
        channels=max(q.channels for q in layers),
        hidden=shape.hidden_size - hidden_kept,
        params_before=before,
        params_after=after,
        params_target=target_after,
        tolerance=tolerance,
        kept={
            "num_key_value_heads": [s.num_kv_heads - q.kv_groups for q in layers],
            "num_attention_heads": heads,
            "intermediate_size": [inter - q.channels for q in layers],
            "hidden_size": s.hidden_size,
            "head_dim": s.head_dim,
        },
        layers=layers,
    )
