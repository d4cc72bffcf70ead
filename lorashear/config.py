"""Job specs: the versioned JSON contract between the CLI, the HTTP API and the worker.

Standard library only: the API validates specs with this module in a process where torch cannot be imported.
Every field is documented once, by the string literal that follows it; :func:`field_docs` reads those strings for
the CLI help and the API schema. Ratios are fractions in [0, 1]; lengths are in tokens; durations are in optimizer
steps, never epochs.

A minimal spec is ``{"model": "stories260K", "target_ratio": 0.2}``; every other field has a default, and the
data defaults name the TinyStories slices bundled with the package.

Raises:
    ConfigError: from every constructor and :meth:`JobSpec.from_dict`, naming the field (dotted path) and the
        value received.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import re
import string
import textwrap
import warnings
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar, get_args, get_origin, get_type_hints

from lorashear.errors import ConfigError

SPEC_VERSION = 1
"""Version of the spec JSON; bumped when a field changes meaning. Older versions are migrated in ``from_dict``."""

EXPORT_FORMATS = ("safetensors", "gguf")
"""File formats the export writes (``export.formats``)."""
GGUF_FAMILIES = ("llama", "mistral")
"""Model types the GGUF export writes (llama.cpp's ``llama`` architecture)."""

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Linear layers of a LLaMA-family decoder layer that may carry LoRA."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*(/[A-Za-z0-9][A-Za-z0-9._\-]*)*$")


_UNKNOWN_FIELDS: ContextVar[str] = ContextVar("lorashear_unknown_fields", default="warn")
"""How :meth:`JobSpec.from_dict` treats keys it does not know: ``warn`` (ignored with a ``UserWarning``) or
``error`` (``ConfigError`` naming them); set for one call by its ``unknown_fields`` argument."""


def _fail(path: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: {message}", field=path)


def _check_ratio(path: str, value: Any, *, low_open: bool = False, high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(path, f"expected a number between 0 and 1, got {value!r}")
    if value < 0 or value > 1 or (low_open and value == 0) or (high_open and value == 1):
        lo = "(0" if low_open else "[0"
        hi = "1)" if high_open else "1]"
        raise _fail(path, f"expected a fraction in {lo}, {hi}, got {value!r}")


MAX_STEPS = 10_000_000
"""Upper bound of any step, round or period count: a spec must describe a job that can end."""
MAX_TOKENS = 1_000_000_000
"""Upper bound of token counts (calibration tokens, sequence lengths)."""


def _check_int(path: str, value: Any, minimum: int = 0, maximum: int = 2**31 - 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, f"expected an integer, got {value!r}")
    if value < minimum or value > maximum:
        raise _fail(path, f"expected an integer in [{minimum}, {maximum}], got {value!r}")


def _check_positive(path: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise _fail(path, f"expected a positive number, got {value!r}")


def _check_choice(path: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise _fail(path, f"expected one of {', '.join(choices)}, got {value!r}")


def check_name(path: str, value: Any) -> None:
    """Check that ``value`` is a relative name (``a/b.txt``): no absolute path, no ``..``, no backslash.

    Raises:
        ConfigError: naming ``path`` and the value.
    """
    if not isinstance(value, str) or not value:
        raise _fail(path, f"expected a non-empty name, got {value!r}")
    if len(value) > 1024 or any(len(part) > 255 for part in value.split("/")):
        raise _fail(path, f"name too long ({len(value)} characters; at most 255 per part and 1024 in all)")
    if not _NAME_RE.match(value) or any(part in ("..", ".") for part in value.split("/")):
        raise _fail(
            path,
            f"{value!r} is not a valid name: use letters, digits, '.', '_', '-' and '/' between parts, "
            "relative to the configured root (no absolute paths, no '..')",
        )


class _Section:
    """Mixin: strict construction from dicts, validation with dotted field paths, JSON round trip."""

    _path: ClassVar[str] = ""

    def validate(self, path: str) -> None:  # pragma: no cover - overridden
        """Check every field; ``path`` prefixes field names in errors."""

    def __post_init__(self) -> None:
        self.validate(self._path)

    @classmethod
    def from_dict(cls, data: Any, path: str = "") -> Any:
        """Build from a JSON object; unknown keys warn, wrong types raise ``ConfigError`` naming the field."""
        path = path or cls._path
        if not isinstance(data, dict):
            raise _fail(path or "spec", f"expected an object, got {type(data).__name__}")
        hints = get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
        kwargs: dict[str, Any] = {}
        unknown = [str(key) for key in data if key not in names]
        if unknown and _UNKNOWN_FIELDS.get() == "error":
            subs = [f"{path}.{key}" if path else key for key in unknown]
            shown = ", ".join(repr(k[:64]) for k in subs[:5]) + (f" and {len(subs) - 5} more" if len(subs) > 5 else "")
            raise ConfigError(
                f"unknown spec field{'s' if len(subs) > 1 else ''} {shown}; known fields here: "
                f"{', '.join(sorted(n for n in names if not n.startswith('_')))}",
                field=subs[0][:200],
            )
        for key, value in data.items():
            sub = f"{path}.{key}" if path else key
            if key not in names:
                warnings.warn(f"unknown spec field {sub!r} ignored", UserWarning, stacklevel=3)
                continue
            kwargs[key] = _convert(hints[key], value, sub)
        try:
            obj = cls.__new__(cls)
            defaults = cls()  # type: ignore[call-arg]
            for f in dataclasses.fields(cls):  # type: ignore[arg-type]
                setattr(obj, f.name, kwargs.get(f.name, getattr(defaults, f.name)))
        except TypeError as exc:  # pragma: no cover - every section has defaults
            raise _fail(path or "spec", str(exc)) from None
        obj.validate(path)
        return obj

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (sections nested)."""
        return _to_jsonable(self)


def _to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_jsonable(v) for k, v in value.items()}
    return value


def _convert(hint: Any, value: Any, path: str) -> Any:
    """Convert a JSON value to the annotated type, raising ``ConfigError`` on type mismatch."""
    origin = get_origin(hint)
    args = get_args(hint)
    if origin is type(None) or hint is type(None):
        return value
    if origin is not None and type(None) in args:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, path)
    if isinstance(hint, type) and issubclass(hint, _Section):
        return hint.from_dict(value, path)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise _fail(path, f"expected a list, got {value!r}")
        item = args[0] if args else Any
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(path, f"expected an object, got {value!r}")
        return {str(k): _convert(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(path, f"expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise _fail(path, f"expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise _fail(path, f"expected true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise _fail(path, f"expected a string, got {value!r}")
        return value
    return value


@dataclass
class LoRAConfig(_Section):
    """LoRA adapters: attached fresh unless ``JobSpec.adapter`` names an existing PEFT adapter."""

    _path: ClassVar[str] = "lora"

    rank: int = 8
    """LoRA rank r (>= 1); ignored when an existing adapter is given (its own rank is used). A larger rank gives
    LHSPG more room to move what it removes into the adapter: on SmolLM2-135M at equal training tokens, rank 32 /
    alpha 64 scored zero-shot avg5 42.8 (three seeds: 44.6, 42.4, 41.4) vs 42.7 (20% removed) and 38.6 (two
    seeds: 39.1, 38.1) vs 37.6 (50%) against rank 8 / alpha 16, and lower perplexity before recovery at both
    ratios; rank 64 gained nothing more (37.8 at 50%) (``bench/results/quality-smollm2.md``, issue 9)."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with ``use_rslora``)."""
    dropout: float = 0.0
    """Dropout on the LoRA input, fraction 0-1. Keep 0 for bit-exact resume."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Projections that carry LoRA, any of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    train_norms: bool = False
    """Also train the weights of the normalisation layers (RMSNorm / LayerNorm, ``(hidden_size,)`` each: 2 per
    decoder layer plus the final one) beside the LoRA, in LHSPG and recovery, without weight decay. Pruning removes
    whole heads and channels, so the scale each layer writes into the residual stream changes; the norm weights
    re-balance it per hidden channel, which a low-rank update cannot. The norms are base weights: with
    ``export.merge_lora: false`` the tuned norms live in ``model/`` and the adapter holds only the LoRA. On
    SmolLM2-135M at 50% (rank 32, ``bench/results/quality-smollm2.md``) WikiText-2 perplexity 145.98 against
    158.85 and avg5 37.5 against 39.8 (one seed; the four-seed spread of the base row is 38.1-39.8) (issue 9)."""

    def validate(self, path: str) -> None:
        _check_int(f"{path}.rank", self.rank, 1, 4096)
        _check_positive(f"{path}.alpha", self.alpha)
        _check_ratio(f"{path}.dropout", self.dropout, high_open=True)
        if not isinstance(self.target_modules, list) or not self.target_modules:
            raise _fail(f"{path}.target_modules", f"expected a non-empty list, got {self.target_modules!r}")
        for i, name in enumerate(self.target_modules):
            _check_choice(f"{path}.target_modules[{i}]", name, LORA_TARGETS)
        if len(set(self.target_modules)) != len(self.target_modules):
            raise _fail(f"{path}.target_modules", f"duplicate entries in {self.target_modules!r}")


LAYOUTS = ("uniform", "per_layer")
"""Width layouts of the pruned model (issue 9)."""


@dataclass
class StructureConfig(_Section):
    """Which minimally removable structures may be pruned, and how widths are rounded (ALGORITHM.md section 1)."""

    _path: ClassVar[str] = "structures"

    attention: bool = True
    """Prune attention: whole heads (MHA) or KV groups / equal query heads per KV group (GQA)."""
    mlp: bool = True
    """Prune MLP intermediate channels."""
    hidden: bool = False
    """Also prune the hidden dimension (embedding, norms and every projection; RMSNorm's weight and epsilon are
    rescaled so slicing stays exact). Off by default."""
    attention_unit: str = "auto"
    """GQA only: ``kv_group`` removes whole KV groups, ``query_head`` removes the same number of query heads from
    every KV group, ``auto`` picks the combination whose attention reduction is nearest the budget."""
    channel_multiple: int = 1
    """Round the kept MLP width to a multiple of this many channels (8 or 64 help GPU kernels)."""
    hidden_multiple: int = 8
    """Round the kept hidden width to a multiple of this many dimensions (only with ``hidden``)."""
    hidden_fraction: float | None = None
    """Only with ``hidden``: fraction 0-1 of the hidden dimensions to remove (the kept width rounded to
    ``hidden_multiple``), the rest of the budget coming from heads and channels. ``None`` lets the uniform layout's
    balance rule pick it (the same removed fraction as attention and MLP); the ``per_layer`` layout needs it, since
    the hidden dimension is model-wide while the layer map allocates per layer (issue 9)."""
    attention_share: float | None = None
    """Fraction 0-1 of the removed parameters that should come from attention; ``None`` prunes attention and MLP
    by the same fraction of their parameters (the usual LLM-Pruner/FLAP setting) in the uniform layout, and by
    what the layer map says in the ``per_layer`` layout. ``per_layer``: the map still ranks the layers within
    attention and within MLP; the share moves the split between the two (rounded to whole heads). Raises
    ``TargetNotExpressibleError`` when gamma leaves attention too little or too much to give that share."""
    layout: str = "uniform"
    """``uniform``: every layer keeps the same widths (stock transformers classes load the export). ``per_layer``:
    each layer's attention and MLP lose what the knowledge-distribution analysis says they can spare
    (:func:`~lorashear.budget.plan_layer_quotas`; issue 9); the export is a ``lorashear_<family>`` model that
    ``AutoModelForCausalLM.from_pretrained`` loads once ``lorashear`` is imported. With ``hidden``, set
    ``hidden_fraction``."""
    sensitivity_exponent: float = 1.0
    """``per_layer`` only: how strongly the layer map steers the allocation, 0-4. Each layer node group loses the
    fraction ``c * (params * a**2 / deviation) ** sensitivity_exponent`` (``a``: the analysed ablation fraction,
    ``c``: set to meet the budget), capped by gamma: 0 gives every node group the same fraction, 1 is the loss
    optimum when the loss grows with the square of the removed fraction."""

    def validate(self, path: str) -> None:
        for name in ("attention", "mlp", "hidden"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(f"{path}.{name}", f"expected true or false, got {getattr(self, name)!r}")
        if not (self.attention or self.mlp or self.hidden):
            raise _fail(path, "at least one of attention, mlp, hidden must be true")
        _check_choice(f"{path}.attention_unit", self.attention_unit, ("auto", "kv_group", "query_head"))
        _check_int(f"{path}.channel_multiple", self.channel_multiple, 1, 4096)
        _check_int(f"{path}.hidden_multiple", self.hidden_multiple, 1, 4096)
        if self.attention_share is not None:
            _check_ratio(f"{path}.attention_share", self.attention_share)
        _check_choice(f"{path}.layout", self.layout, LAYOUTS)
        if isinstance(self.sensitivity_exponent, bool) or not isinstance(self.sensitivity_exponent, (int, float)):
            raise _fail(f"{path}.sensitivity_exponent", f"expected a number, got {self.sensitivity_exponent!r}")
        if not 0 <= self.sensitivity_exponent <= 4:
            raise _fail(f"{path}.sensitivity_exponent", f"expected 0-4, got {self.sensitivity_exponent!r}")
        if self.hidden_fraction is not None:
            _check_ratio(f"{path}.hidden_fraction", self.hidden_fraction, high_open=True)
            if not self.hidden:
                raise _fail(f"{path}.hidden_fraction", "needs hidden = true (hidden-dimension pruning is off)")
        if self.layout == "per_layer" and self.hidden and self.hidden_fraction is None:
            raise _fail(
                f"{path}.hidden_fraction",
                "per_layer prunes heads and channels per layer while the hidden dimension is model-wide: with "
                "hidden = true give the fraction of hidden dimensions to remove (e.g. 0.11), or use the uniform layout",
            )


LR_SCHEDULE_NAMES = ("constant", "linear", "cosine")
"""Learning-rate schedules of recovery (``recovery.lr_schedule``; :data:`lorashear.training.LR_SCHEDULES`)."""

PROBES = ("magnitude", "taylor")
"""Group rankings the per-layer map's probes may ablate by (``analysis.probe``)."""


@dataclass
class AnalysisConfig(_Section):
    """Knowledge-distribution analysis (ALGORITHM.md section 2)."""

    _path: ClassVar[str] = "analysis"

    gamma: float = 0.1
    """Unprunable ratio: fraction 0-1 of each layer's groups (per structure type) with the highest knowledge score
    that LHSPG may never remove. In the uniform layout every layer keeps the same width, so gamma protects groups
    inside each layer; the per-layer sensitivity map is still measured and reported."""
    ablation_fraction: float = 0.5
    """For the per-layer map: fraction of a layer node group's least salient slices zeroed when probing it."""
    probe: str = "magnitude"
    """For the per-layer map: which groups a probe zeroes, the ``ablation_fraction`` with the smallest
    ``magnitude`` (weight L2 norm, the paper's probe) or the smallest ``taylor`` knowledge score (the groups the
    Taylor importance of LHSPG would remove first, so the map measures the cut that pruning makes; issue 9). On
    SmolLM2-135M with LoRA rank 32 (``bench/results/quality-smollm2.md``), ``taylor`` measured perplexity 160.5 vs
    191.4 at 50% removed (mean of two seeds; avg5 39.0 vs 38.6) and 63.88 vs 64.27 at 20% (one seed; avg5 43.0 vs
    44.6, inside the error bar); ``magnitude`` stays the default until more seeds settle the zero-shot side."""
    max_tokens: int = 16384
    """Tokens of calibration text used for the analysis (split into windows of ``seq_len``)."""
    seq_len: int = 256
    """Window length in tokens for the analysis forward passes."""

    def validate(self, path: str) -> None:
        _check_ratio(f"{path}.gamma", self.gamma, high_open=True)
        _check_ratio(f"{path}.ablation_fraction", self.ablation_fraction, low_open=True)
        _check_choice(f"{path}.probe", self.probe, PROBES)
        _check_int(f"{path}.max_tokens", self.max_tokens, 1, MAX_TOKENS)
        _check_int(f"{path}.seq_len", self.seq_len, 8, 131_072)


CRITERIA = ("magnitude", "avg_magnitude", "cosine", "taylor_first_order", "taylor_second_order")
"""Saliency criteria of LHSPG (ALGORITHM.md section 3)."""


@dataclass
class LHSPGConfig(_Section):
    """LoRA Half-Space Projected Gradient: progressive structured pruning (ALGORITHM.md section 3)."""

    _path: ClassVar[str] = "lhspg"

    mode: str = "decay"
    """``decay``: linear ramp of the redundant groups to zero over a period; ``hsp``: half-space projection."""
    warmup_steps: int = 20
    """Optimizer steps of plain LoRA training before the first period (T_w)."""
    periods: int = 4
    """Number of pruning periods P; each removes about 1/P of every structure type's quota."""
    period_steps: int = 20
    """Optimizer steps per period (T)."""
    lr: float = 1e-3
    """AdamW learning rate of the LoRA weights."""
    weight_decay: float = 0.0
    """AdamW weight decay of the LoRA weights."""
    batch_size: int = 8
    """Sequences per optimizer step."""
    seq_len: int = 128
    """Tokens per training sequence."""
    epsilon: float = 0.0
    """hsp mode: half-space threshold eps in [0, 0.9]."""
    lambda_init: float = 1.0
    """hsp mode: initial group-sparsity strength lambda, scale-free: 1.0 shrinks a group's norm linearly to zero over
    one period (the step is lambda * ||W_g|| / period_steps)."""
    lambda_growth: float = 0.05
    """hsp mode: lambda grows by this fraction each step, bounded by ``lambda_max``."""
    lambda_max: float = 4.0
    """hsp mode: upper bound of lambda."""
    fold_lora_each_period: bool = False
    """At each period end, fold s*B*A of kept groups into W and reset B (keeps the LoRA small)."""
    importance: str = "taylor"
    """How a period picks the groups to remove (lowest first): ``taylor`` (default), the first-order Taylor
    importance of each group's output, ``|sum <dL/da_g, a_g>|``, accumulated over every LHSPG step so far from the
    backward pass that trains the LoRA anyway; or ``lora_saliency``, the paper code's five criteria on ``W`` and
    ``s B A`` (weights in ``criteria``) (ALGORITHM.md section 3); or ``fisher``, the group's joint first-order
    term squared per sequence, ``sum_seq (sum <dL/da_g, a_g>)^2`` (an empirical Fisher estimate of the loss increase,
    from the same backward passes; at 50% on SmolLM2-135M level with ``taylor``: 167.64 / 39.2 against 158.85 /
    39.8). Taylor is the default because it measured better than ``lora_saliency``:
    on SmolLM2-135M at 20% removed, perplexity 84.4 vs 113.3 before recovery and 64.34 vs 86.38 after, zero-shot
    avg5 42.7 vs 40.2 (``bench/results/quality-smollm2.md``, issue 9)."""
    criteria: dict[str, float] = field(default_factory=lambda: {c: 0.2 for c in CRITERIA})
    """Saliency criteria and weights of ``lora_saliency``; each criterion is normalised by its L2 norm over groups
    before weighting."""
    max_grad_norm: float = 1.0
    """Gradient clipping of the trained weights (L2 norm over the LoRA, and the norms with ``lora.train_norms``)."""
    distill: float = 0.0
    """Weight 0-1 of knowledge distillation from the dense model: the loss is ``(1 - distill) * cross-entropy +
    distill * KL(dense || pruned)`` over the next-token distributions (temperature 1) of the scored positions. The
    dense model is a frozen copy kept beside the pruned one (its weights' memory once more). 0: off (issue 9)."""
    importance_data: str = "train"
    """Which batches the accumulated importance (``taylor``, ``fisher``) is measured on: ``train`` (default), the
    LHSPG training batches themselves, from the backward pass that trains the LoRA anyway; or ``calibration``, one
    extra forward and backward pass per step on ``batch_size`` windows of the calibration text (``data.calibration``,
    windows of ``analysis.seq_len`` in order, cycling; cross-entropy, no update), so the groups are ranked on the
    analysis' text (with ``data.calibration_source: generated``, the model's own samples) while the LoRA trains on
    the pool. Costs about one more forward/backward per step; calibration passes are not training tokens (issue 9)."""
    instruct_share: float = 0.0
    """Fraction 0-1 of LHSPG batches drawn from the instruction sub-datasets (``data.instruct``, records rendered
    with the prompt template, loss on the responses only) instead of the plain-text pool; each batch picks its source
    by a draw with this probability. The Taylor importance accumulates over the same batches, so the share steers
    which heads and channels count as important towards question/answer text. 0 (default): every batch from the
    plain-text pool, as in the paper (issue 9)."""

    def validate(self, path: str) -> None:
        _check_choice(f"{path}.mode", self.mode, ("decay", "hsp"))
        _check_choice(f"{path}.importance", self.importance, ("lora_saliency", "taylor", "fisher"))
        _check_choice(f"{path}.importance_data", self.importance_data, ("train", "calibration"))
        if self.importance_data == "calibration" and self.importance == "lora_saliency":
            raise _fail(
                f"{path}.importance_data",
                "'calibration' needs an accumulated importance (lhspg.importance taylor or fisher), not lora_saliency",
            )
        _check_int(f"{path}.warmup_steps", self.warmup_steps, 0, MAX_STEPS)
        _check_int(f"{path}.periods", self.periods, 1, 10_000)
        _check_int(f"{path}.period_steps", self.period_steps, 1, MAX_STEPS)
        _check_positive(f"{path}.lr", self.lr)
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise _fail(f"{path}.weight_decay", f"expected a number >= 0, got {self.weight_decay!r}")
        _check_int(f"{path}.batch_size", self.batch_size, 1, 65_536)
        _check_int(f"{path}.seq_len", self.seq_len, 8, 131_072)
        _check_ratio(f"{path}.epsilon", self.epsilon)
        if self.epsilon > 0.9:
            raise _fail(f"{path}.epsilon", f"expected a value in [0, 0.9], got {self.epsilon!r}")
        _check_positive(f"{path}.lambda_init", self.lambda_init)
        if not isinstance(self.lambda_growth, (int, float)) or self.lambda_growth < 0:
            raise _fail(f"{path}.lambda_growth", f"expected a number >= 0, got {self.lambda_growth!r}")
        _check_positive(f"{path}.lambda_max", self.lambda_max)
        if not isinstance(self.criteria, dict) or not self.criteria:
            raise _fail(f"{path}.criteria", f"expected a non-empty object, got {self.criteria!r}")
        for name, weight in self.criteria.items():
            _check_choice(f"{path}.criteria", name, CRITERIA)
            if not isinstance(weight, (int, float)) or weight < 0:
                raise _fail(f"{path}.criteria.{name}", f"expected a weight >= 0, got {weight!r}")
        if sum(self.criteria.values()) <= 0:
            raise _fail(f"{path}.criteria", "at least one criterion needs a positive weight")
        _check_positive(f"{path}.max_grad_norm", self.max_grad_norm)
        _check_ratio(f"{path}.distill", self.distill)
        _check_ratio(f"{path}.instruct_share", self.instruct_share)
        if self.total_steps > MAX_STEPS:
            raise _fail(f"{path}.period_steps", f"warm-up plus periods x period_steps exceeds {MAX_STEPS:,} steps")

    @property
    def total_steps(self) -> int:
        """Warm-up plus all periods, in optimizer steps."""
        return self.warmup_steps + self.periods * self.period_steps


@dataclass
class DatasetConfig(_Section):
    """One named sub-dataset for recovery: a text file (paragraphs separated by blank lines) or JSON lines."""

    _path: ClassVar[str] = "dataset"

    name: str = ""
    """Short label used in logs and the report (e.g. ``wiki``, ``dialogue``)."""
    train: str = ""
    """Training file name (relative to the data root); ``.txt`` is plain text, ``.jsonl`` holds ``text`` records
    or instruction records with ``instruction``, optional ``input`` and ``output``."""
    validation: str | None = None
    """Validation file name; when absent the last ``validation_fraction`` of the training records is held out."""
    validation_fraction: float = 0.1
    """Fraction 0-1 of records held out when ``validation`` is absent."""

    def validate(self, path: str) -> None:
        if not isinstance(self.name, str) or not re.match(r"^[A-Za-z0-9_.\-]{1,64}$", self.name):
            raise _fail(f"{path}.name", f"expected 1-64 letters, digits, '_', '.', '-', got {self.name!r}")
        if self.train == "" and self.name == "":
            return  # the default instance used by from_dict
        check_name(f"{path}.train", self.train)
        if self.validation is not None:
            check_name(f"{path}.validation", self.validation)
        _check_ratio(f"{path}.validation_fraction", self.validation_fraction, low_open=True, high_open=True)

    def __post_init__(self) -> None:  # a blank instance is the from_dict template only
        if self.name or self.train:
            self.validate(self._path)


def _default_pretrain() -> list[DatasetConfig]:
    return [
        DatasetConfig("dialogue", "tinystories/train_dialogue.txt", "tinystories/valid_dialogue.txt"),
        DatasetConfig("narrative", "tinystories/train_narrative.txt", "tinystories/valid_narrative.txt"),
    ]


def _default_instruct() -> list[DatasetConfig]:
    return [
        DatasetConfig("continue", "tinystories/instruct_continue.jsonl"),
        DatasetConfig("ending", "tinystories/instruct_ending.jsonl"),
    ]


PROMPT_TEMPLATE_NAMES = ("alpaca", "question_answer")
"""Named values of ``data.prompt_template`` (:data:`lorashear.data.PROMPT_TEMPLATES` renders them; issue 9)."""


def _check_prompt_template(path: str, value: object) -> None:
    """A template name, or a format string whose only fields are ``{instruction}`` (required) and ``{input}``."""
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, f"expected a template name or format string, got {value!r}")
    if value in PROMPT_TEMPLATE_NAMES:
        return
    try:
        parsed = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(value) if name is not None]
    except ValueError as exc:
        raise _fail(path, f"not a valid format string ({exc}); write a literal brace as {{{{ or }}}}") from None
    if any(spec or conv for _, spec, conv in parsed):  # a width such as {instruction:>999999999} would be a DoS
        raise _fail(path, "placeholders take no format spec or conversion: write {instruction} and {input} bare")
    fields = {name for name, _, _ in parsed}
    names = ", ".join(PROMPT_TEMPLATE_NAMES)
    if "instruction" not in fields:
        raise _fail(path, f"expected one of {names} or a format string with {{instruction}}, got {value[:80]!r}")
    unknown = sorted(fields - {"instruction", "input"})
    if unknown:
        raise _fail(path, f"unknown placeholder(s) {unknown}: only {{instruction}} and {{input}}")


@dataclass
class DataConfig(_Section):
    """Text for analysis, pruning and evaluation; file names are relative to the data root."""

    _path: ClassVar[str] = "data"

    calibration: str = "tinystories/calibration.txt"
    """Held-out text for the knowledge-distribution analysis: a text file, or a ``.json`` / ``.jsonl`` record
    file whose records are rendered with the prompt template (instruction data, issue 9)."""
    calibration_source: str = "text"
    """Where the analysis' calibration windows come from: ``text`` (default), ``data.calibration`` as read; or
    ``generated``, text the dense model samples itself (top-k 50, top-p 0.95, temperature 1, seeded by
    ``seed``), each window of ``analysis.seq_len`` tokens prompted by the first 4 tokens of one window of
    ``data.calibration``, up to ``analysis.max_tokens`` tokens in all. Self-generated calibration follows the
    model's own distribution rather than one corpus' (Ji et al. 2024, "Beware of Calibration Data for Pruning
    Large Language Models"); costs one sampled token per calibration token at load. On SmolLM2-135M at 20% it
    helped untrained one-shot Taylor (uniform layout, a probe outside the benchmark table: avg5 40.2 vs 37.9,
    paired +2.3 +- 1.4; WikiText-2 perplexity 609 vs 495) but not LoRAShear: with ``lhspg.importance_data:
    calibration`` too, 75.87 / avg5 41.2 against 65.20 / 43.0 (three-seed mean) measured on WikiText-2 valid and
    the training batches (``bench/results/quality-smollm2.md``, ``-selfcalib``; issue 9). ``text`` stays the
    default."""
    train: list[DatasetConfig] = field(default_factory=_default_pretrain)
    """Pretraining-style sub-datasets: LHSPG trains on their union; recovery stage 1 re-weights them."""
    instruct: list[DatasetConfig] = field(default_factory=_default_instruct)
    """Instruction sub-datasets for recovery stage 2 (may be empty)."""
    eval: str = "tinystories/eval.txt"
    """Evaluation text for perplexity; must not be any training file."""
    prompt_template: str = "alpaca"
    """How instruction records (``instruction``, ``input``, ``output``) become text: ``alpaca`` (the Alpaca
    paper's ``### Instruction:`` / ``### Response:``), ``question_answer`` (``Question: ...`` / ``Answer: ...``, the
    shape of lm-eval's ARC and PIQA prompts), or a custom format string over ``{instruction}`` (required) and
    ``{input}``, e.g. ``"<|user|>{instruction} {input}<|assistant|>"``. Used wherever records are read: recovery's
    instruction stage, ``lhspg.instruct_share``, a record file as ``data.calibration``. On SmolLM2-135M at 50%
    ``question_answer`` measured what ``alpaca`` did (perplexity 159.64 vs 158.85, avg5 39.8 vs 39.8; issue 9)."""

    def validate(self, path: str) -> None:
        check_name(f"{path}.calibration", self.calibration)
        _check_choice(f"{path}.calibration_source", self.calibration_source, ("text", "generated"))
        check_name(f"{path}.eval", self.eval)
        if not isinstance(self.train, list) or not self.train:
            raise _fail(f"{path}.train", "expected at least one pretraining-style dataset")
        for key in ("train", "instruct"):
            items = getattr(self, key)
            if not isinstance(items, list):
                raise _fail(f"{path}.{key}", f"expected a list, got {items!r}")
            names = [d.name for d in items]
            if len(set(names)) != len(names):
                raise _fail(f"{path}.{key}", f"dataset names must be unique, got {names}")
            for i, d in enumerate(items):
                if not isinstance(d, DatasetConfig):
                    raise _fail(f"{path}.{key}[{i}]", f"expected a dataset object, got {d!r}")
                d.validate(f"{path}.{key}[{i}]")
                if d.name == "":
                    raise _fail(f"{path}.{key}[{i}].name", "a dataset needs a name")
        _check_prompt_template(f"{path}.prompt_template", self.prompt_template)
        training = {d.train for d in self.train + self.instruct}
        if self.eval in training:
            raise _fail(f"{path}.eval", f"{self.eval!r} is also a training file; evaluation text must be held out")


@dataclass
class RecoveryConfig(_Section):
    """Dynamic knowledge recovery (ALGORITHM.md section 5): two stages of LoRA fine-tuning with re-weighted data."""

    _path: ClassVar[str] = "recovery"

    enabled: bool = True
    """Run recovery at all."""
    rounds: int = 3
    """Rounds per stage; mix weights are re-set from the deviation to the dense model at each round start."""
    steps_per_round: int = 20
    """Optimizer steps per round."""
    instruct_rounds: int | None = None
    """Rounds of stage 2 (defaults to ``rounds``); 0 skips stage 2. On SmolLM2-135M at 50% (issue 9 benchmark)
    0 / 2 / 3 instruction rounds of 13 steps (the rest in stage 1, same total) measured WikiText-2 perplexity
    106.52 / 158.85 / 198.06 and avg5 37.9 / 39.8 / 38.7: fewer instruction steps, lower perplexity."""
    lr: float = 1e-3
    """AdamW learning rate of the LoRA weights."""
    batch_size: int = 8
    """Sequences per optimizer step."""
    seq_len: int = 128
    """Tokens per training sequence."""
    weighting: str = "linear"
    """``linear``: w_i proportional to max(L_i - L_ref_i, 0); ``exp``: w <- softmax(log w + eta (L - L_ref))."""
    eta: float = 1.0
    """Step size of the exponential weighting."""
    uniform_share: float = 0.1
    """Fraction 0-1 of the mix spread uniformly so no sub-dataset is starved."""
    tau: float = 0.0
    """Stop a stage early once every deviation max(L_i - L_ref_i, 0) is below tau (nats)."""
    eval_batches: int = 8
    """Validation batches per sub-dataset when measuring deviations."""
    lr_schedule: str = "constant"
    """How the learning rate moves over all recovery steps (both stages, one schedule): ``constant``, ``linear``
    or ``cosine`` decay towards 0 at the last step (:data:`~lorashear.training.LR_SCHEDULES`; issue 9). On
    SmolLM2-135M at 50% (``bench/results/quality-smollm2.md``) ``cosine`` measured WikiText-2 perplexity 135.12
    against 158.85 and avg5 38.1 against 39.8 (one seed): the decay shortens the steps on instruction text, which
    come last."""
    warmup_steps: int = 0
    """Optimizer steps of linear learning-rate warm-up at the start of recovery (before the schedule)."""
    distill: float = 0.0
    """Weight 0-1 of knowledge distillation from the dense model: the loss is ``(1 - distill) * cross-entropy +
    distill * KL(dense || pruned)`` over the next-token distributions (temperature 1) of the scored positions. The
    dense model is a frozen copy kept beside the pruned one (its weights' memory once more). 0: off (issue 9)."""
    ema: float = 0.0
    """Decay 0-1 (exclusive of 1) of an exponential moving average of the trained weights (the LoRA, and the norms
    with ``lora.train_norms``), updated after every optimizer step from the weights recovery starts with; when
    recovery ends the average replaces them (Polyak averaging; it spans about ``1 / (1 - ema)`` steps). The
    per-round mix weights are measured on the live weights. 0: off (issue 9)."""
    reconstruct: bool = False
    """Before the fine-tuning, refit the kept input columns of every layer's output projections (``o_proj``,
    ``down_proj``) by ridge least squares, layer by layer, so each pruned block writes what the dense block wrote on
    ``reconstruct_tokens`` tokens of the training text (:mod:`lorashear.recovery.reconstruct`; no gradient steps,
    so not training tokens). Keeps the dense model's copy beside the pruned one, as ``distill`` does. Not with
    ``structures.hidden`` (issue 9)."""
    reconstruct_tokens: int = 8192
    """Tokens of training text (windows of ``seq_len`` drawn from the plain-text training data with the job's seed)
    the refit is fitted on."""
    reconstruct_ridge: float = 1.0
    """Ridge coefficient of the refit, a fraction (> 0) of the mean diagonal of the inputs' Gram matrix; larger stays
    closer to the weights LHSPG left."""
    reconstruct_target: str = "block"
    """What each output projection is refitted to: ``block``, the dense module's output; ``stream``, that output
    plus the gap between the dense and the pruned residual stream where the module adds to it (each module also
    cancels what earlier layers left)."""

    def validate(self, path: str) -> None:
        _check_int(f"{path}.rounds", self.rounds, 1, 10_000)
        _check_int(f"{path}.steps_per_round", self.steps_per_round, 1, MAX_STEPS)
        if self.instruct_rounds is not None:
            _check_int(f"{path}.instruct_rounds", self.instruct_rounds, 0, 10_000)
        _check_positive(f"{path}.lr", self.lr)
        _check_int(f"{path}.batch_size", self.batch_size, 1, 65_536)
        _check_int(f"{path}.seq_len", self.seq_len, 8, 131_072)
        _check_choice(f"{path}.weighting", self.weighting, ("linear", "exp"))
        _check_choice(f"{path}.lr_schedule", self.lr_schedule, LR_SCHEDULE_NAMES)
        _check_int(f"{path}.warmup_steps", self.warmup_steps, 0, MAX_STEPS)
        _check_positive(f"{path}.eta", self.eta)
        _check_ratio(f"{path}.uniform_share", self.uniform_share)
        if not isinstance(self.tau, (int, float)) or self.tau < 0:
            raise _fail(f"{path}.tau", f"expected a number >= 0, got {self.tau!r}")
        _check_int(f"{path}.eval_batches", self.eval_batches, 1, 100_000)
        _check_ratio(f"{path}.distill", self.distill)
        _check_ratio(f"{path}.ema", self.ema, high_open=True)
        if not isinstance(self.reconstruct, bool):
            raise _fail(f"{path}.reconstruct", f"expected true or false, got {self.reconstruct!r}")
        _check_int(f"{path}.reconstruct_tokens", self.reconstruct_tokens, 8, MAX_TOKENS)
        if self.reconstruct_tokens < self.seq_len:
            raise _fail(
                f"{path}.reconstruct_tokens",
                f"{self.reconstruct_tokens} tokens is less than one window of seq_len={self.seq_len}",
            )
        _check_positive(f"{path}.reconstruct_ridge", self.reconstruct_ridge)
        _check_choice(f"{path}.reconstruct_target", self.reconstruct_target, RECONSTRUCT_TARGETS)


RECONSTRUCT_TARGETS = ("block", "stream")
"""What ``recovery.reconstruct`` refits each output projection to (:mod:`lorashear.recovery.reconstruct`)."""


ZEROSHOT_TASKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande")
"""Zero-shot tasks with a shipped definition (``lorashear/evaluation/lm_tasks``): lm-eval multiple-choice tasks over
llm-foundry JSON-lines files (ALGORITHM.md section 6)."""


@dataclass
class ZeroShotConfig(_Section):
    """Zero-shot accuracy through lm-eval (ALGORITHM.md section 6); the dense and the final model are scored with the
    same settings."""

    _path: ClassVar[str] = "evaluation.zeroshot"

    enabled: bool = True
    """Score the dense and the final model."""
    tasks: list[str] = field(
        default_factory=lambda: ["arc_easy", "arc_challenge", "boolq", "openbookqa", "piqa", "winogrande"]
    )
    """Tasks to score, any of arc_easy, arc_challenge, boolq, hellaswag, openbookqa, piqa, winogrande."""
    limit: int | None = 20
    """Score at most this many documents per task (the first ones of the file); ``None``: the whole file."""
    batch_size: int = 16
    """Sequences per forward pass (lm-eval's batch size; results do not depend on it beyond float rounding)."""
    task_dir: str = "zeroshot"
    """Directory under the data root holding ``<task file>.jsonl`` in the llm-foundry layout (the file names of
    llm-foundry's ``eval/local_data``: arc_easy, arc_challenge, boolq, hellaswag, openbook_qa, piqa, winogrande).
    The default names the slices bundled with the package."""
    files: dict[str, str] = field(default_factory=dict)
    """Per-task file overrides ``{task: name under the data root}``, e.g.
    ``{"hellaswag": "zeroshot/hellaswag_small.jsonl"}``."""

    def validate(self, path: str) -> None:
        if not isinstance(self.enabled, bool):
            raise _fail(f"{path}.enabled", f"expected true or false, got {self.enabled!r}")
        if not isinstance(self.tasks, list) or not self.tasks:
            raise _fail(f"{path}.tasks", f"expected a non-empty list of task names, got {self.tasks!r}")
        for i, name in enumerate(self.tasks):
            _check_choice(f"{path}.tasks[{i}]", name, ZEROSHOT_TASKS)
        if len(set(self.tasks)) != len(self.tasks):
            raise _fail(f"{path}.tasks", f"duplicate entries in {self.tasks!r}")
        if self.limit is not None:
            _check_int(f"{path}.limit", self.limit, 1, MAX_TOKENS)
        _check_int(f"{path}.batch_size", self.batch_size, 1, 65_536)
        check_name(f"{path}.task_dir", self.task_dir)
        if not isinstance(self.files, dict):
            raise _fail(f"{path}.files", f"expected an object, got {self.files!r}")
        for name, value in self.files.items():
            _check_choice(f"{path}.files.{name}", name, ZEROSHOT_TASKS)
            check_name(f"{path}.files.{name}", value)


@dataclass
class SpeedConfig(_Section):
    """Measured generation speed: prefill and decode tokens/s of the dense and the final model on the job's device
    (greedy decoding with the KV cache, fixed random prompts, warm-up excluded, median of repeats)."""

    _path: ClassVar[str] = "evaluation.speed"

    enabled: bool = True
    """Measure the dense and the final model."""
    prompt_len: int = 64
    """Prompt tokens per sequence (prefill length); prompt_len + new_tokens must fit the model's context."""
    new_tokens: int = 32
    """Tokens generated per sequence after the prompt (decode length)."""
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    """Batch sizes measured (sequences decoded together)."""
    repeats: int = 5
    """Timed repetitions per batch size; the median is reported."""
    warmup: int = 1
    """Untimed repetitions before the timed ones."""

    def validate(self, path: str) -> None:
        if not isinstance(self.enabled, bool):
            raise _fail(f"{path}.enabled", f"expected true or false, got {self.enabled!r}")
        _check_int(f"{path}.prompt_len", self.prompt_len, 1, 131_072)
        _check_int(f"{path}.new_tokens", self.new_tokens, 1, 131_072)
        if not isinstance(self.batch_sizes, list) or not self.batch_sizes:
            raise _fail(f"{path}.batch_sizes", f"expected a non-empty list, got {self.batch_sizes!r}")
        for i, b in enumerate(self.batch_sizes):
            _check_int(f"{path}.batch_sizes[{i}]", b, 1, 4096)
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise _fail(f"{path}.batch_sizes", f"duplicate entries in {self.batch_sizes!r}")
        _check_int(f"{path}.repeats", self.repeats, 1, 1000)
        _check_int(f"{path}.warmup", self.warmup, 0, 1000)


@dataclass
class EvaluationConfig(_Section):
    """Perplexity protocol, zero-shot accuracy and measured speed (ALGORITHM.md section 6)."""

    _path: ClassVar[str] = "evaluation"

    window: int = 128
    """Tokens per window (LLM-Pruner tables use 128; 2048 gives lower numbers for 7B models)."""
    stride: int | None = None
    """Tokens between window starts; ``None`` = ``window`` (non-overlapping)."""
    max_windows: int | None = 64
    """Evaluate at most this many windows (``None``: the whole text)."""
    batch_size: int = 8
    """Windows per forward pass."""
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    """Zero-shot accuracy through lm-eval."""
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    """Measured prefill and decode speed."""

    def validate(self, path: str) -> None:
        _check_int(f"{path}.window", self.window, 2, 131_072)
        if self.stride is not None:
            _check_int(f"{path}.stride", self.stride, 1, 131_072)
            if self.stride > self.window:
                raise _fail(f"{path}.stride", f"stride {self.stride} exceeds window {self.window}")
        if self.max_windows is not None:
            _check_int(f"{path}.max_windows", self.max_windows, 1, MAX_TOKENS)
        _check_int(f"{path}.batch_size", self.batch_size, 1, 65_536)
        for key, kind in (("zeroshot", ZeroShotConfig), ("speed", SpeedConfig)):
            value = getattr(self, key)
            if not isinstance(value, kind):
                raise _fail(f"{path}.{key}", f"expected an object, got {value!r}")
            value.validate(f"{path}.{key}")


@dataclass
class ExportConfig(_Section):
    """What the job writes (ARCHITECTURE.md, artifacts)."""

    _path: ClassVar[str] = "export"

    merge_lora: bool = True
    """Merge the LoRA into ``model/``. When false, ``model/`` is the pruned base and ``adapter/`` holds the LoRA."""
    save_adapter: bool = False
    """Also save the LoRA as a PEFT adapter (``adapter/``) with the pruned base it fits (``pruned_base/``)."""
    dtype: str = "auto"
    """Storage dtype of the exported weights: ``auto`` (the input's own dtype, float32 for GGUF input), float32,
    bfloat16 or float16. A job whose export is not smaller than its input fails."""
    formats: list[str] = field(default_factory=lambda: ["safetensors"])
    """Files to write: ``safetensors`` (``model/``, always written) and optionally ``gguf`` (``model.gguf`` for
    llama.cpp, same weights and dtype, tokenizer included; uniform layout, LLaMA/Mistral models; checked by
    reloading it with transformers' GGUF loader; issue 8)."""

    def validate(self, path: str) -> None:
        _check_choice(f"{path}.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        if not isinstance(self.formats, list) or "safetensors" not in self.formats:
            raise _fail(f"{path}.formats", f"expected a list holding 'safetensors', got {self.formats!r}")
        for i, name in enumerate(self.formats):
            _check_choice(f"{path}.formats[{i}]", name, EXPORT_FORMATS)
        if len(set(self.formats)) != len(self.formats):
            raise _fail(f"{path}.formats", f"lists a format twice: {self.formats!r}")


@dataclass
class RuntimeConfig(_Section):
    """Where and how the job computes."""

    _path: ClassVar[str] = "runtime"

    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    dtype: str = "auto"
    """Compute dtype: ``auto`` = float32 on CPU, bfloat16 on CUDA. float16 is refused on CPU."""
    checkpoint_every: int = 25
    """Write a resumable checkpoint every this many optimizer steps (and at every stage end)."""
    threads: int | None = None
    """CPU threads for torch (``None``: torch's default)."""

    def validate(self, path: str) -> None:
        if not isinstance(self.device, str) or not re.match(r"^(auto|cpu|cuda(:\d+)?)$", self.device):
            raise _fail(f"{path}.device", f"expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        _check_choice(f"{path}.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        if self.dtype == "float16" and self.device == "cpu":
            raise _fail(f"{path}.dtype", "float16 is not supported on CPU; use float32 (or auto)")
        _check_int(f"{path}.checkpoint_every", self.checkpoint_every, 1, MAX_STEPS)
        if self.threads is not None:
            _check_int(f"{path}.threads", self.threads, 1, 1024)


@dataclass
class JobSpec(_Section):
    """A pruning job: the model, how much smaller, and how. Round-trips through JSON (``version`` 1)."""

    _path: ClassVar[str] = ""

    model: str = ""
    """Model name under the model root: a Hugging Face directory with safetensors, or a ``.gguf`` file."""
    target_ratio: float = 0.2
    """Fraction 0-1 of the model's parameters to remove (0.2 = 20% fewer parameters)."""
    adapter: str | None = None
    """Existing PEFT LoRA adapter directory (name under the model root); ``None`` attaches a fresh LoRA."""
    seed: int = 0
    """Seed of every random choice (data order, LoRA init)."""
    version: int = SPEC_VERSION
    """Spec format version."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters."""
    structures: StructureConfig = field(default_factory=StructureConfig)
    """Prunable structures and rounding."""
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    """Knowledge-distribution analysis."""
    lhspg: LHSPGConfig = field(default_factory=LHSPGConfig)
    """Progressive structured pruning."""
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    """Dynamic knowledge recovery."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data files."""
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    """Perplexity protocol, zero-shot accuracy and measured speed."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """Artifacts."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Device, dtype, checkpoints."""

    def __post_init__(self) -> None:
        if self.model:
            self.validate("")

    def validate(self, path: str) -> None:
        if self.version != SPEC_VERSION:
            raise _fail("version", f"unsupported spec version {self.version!r}; this library reads {SPEC_VERSION}")
        check_name("model", self.model)
        _check_ratio("target_ratio", self.target_ratio, low_open=True, high_open=True)
        if self.target_ratio > 0.9:
            raise _fail("target_ratio", f"{self.target_ratio} would remove more than 90% of the model")
        if self.adapter is not None:
            check_name("adapter", self.adapter)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise _fail("seed", f"expected an integer in [0, 2**32), got {self.seed!r}")
        for sec in ("lora", "structures", "analysis", "lhspg", "recovery", "data", "evaluation", "export", "runtime"):
            value = getattr(self, sec)
            expected = get_type_hints(type(self))[sec]
            if not isinstance(value, expected):
                raise _fail(sec, f"expected an object, got {value!r}")
            value.validate(sec)
        if self.structures.hidden and not self.export.merge_lora:
            raise _fail("structures.hidden", "hidden-dimension pruning needs export.merge_lora = true")
        if self.structures.hidden and self.recovery.reconstruct:
            raise _fail(
                "recovery.reconstruct",
                "the refit matches the dense model's layer outputs, which hidden-dimension pruning changes: "
                "not with structures.hidden",
            )
        if self.structures.hidden and self.lora.train_norms:
            raise _fail("lora.train_norms", "hidden-dimension pruning slices and rescales the norms: not with it")
        if self.lhspg.instruct_share > 0 and not self.data.instruct:
            raise _fail("lhspg.instruct_share", f"{self.lhspg.instruct_share} needs data.instruct; the list is empty")
        if "gguf" in self.export.formats and not self.export.merge_lora:
            raise _fail("export.formats", "gguf writes the merged model: it needs export.merge_lora = true")
        if "gguf" in self.export.formats and self.structures.layout != "uniform":
            raise _fail(
                "export.formats",
                "GGUF holds one width per model (llama.cpp and transformers' GGUF loader): use the uniform layout "
                "with gguf, or drop gguf for structures.layout per_layer",
            )

    @classmethod
    def from_dict(cls, data: Any, path: str = "", *, unknown_fields: str | None = None) -> JobSpec:
        """Build and validate a spec from parsed JSON/YAML.

        Args:
            data: the parsed spec.
            path: unused (the spec is the root).
            unknown_fields: ``"warn"`` (default: unknown keys are ignored with a ``UserWarning``) or ``"error"``
                (a ``ConfigError`` naming them, e.g. a typo such as ``lora.rnk``).

        Raises:
            ConfigError: naming the first invalid field (dotted path) and the value received.
        """
        if unknown_fields is not None:
            if unknown_fields not in ("warn", "error"):
                raise ValueError(f"unknown_fields must be 'warn' or 'error', got {unknown_fields!r}")
            token = _UNKNOWN_FIELDS.set(unknown_fields)
            try:
                return cls.from_dict(data, path)
            finally:
                _UNKNOWN_FIELDS.reset(token)
        if not isinstance(data, dict):
            raise _fail("spec", f"expected a JSON object, got {type(data).__name__}")
        if "model" not in data:
            raise _fail("model", "required field missing")
        data = dict(data)
        data.setdefault("version", SPEC_VERSION)
        spec: JobSpec = super().from_dict.__func__(cls, data, "")  # type: ignore[attr-defined]
        return spec

    @classmethod
    def from_json(cls, text: str, *, unknown_fields: str | None = None) -> JobSpec:
        """Parse JSON text (``unknown_fields`` as in :meth:`from_dict`). Raises ``ConfigError`` (field ``spec``) on
        malformed JSON."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _fail("spec", f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
        return cls.from_dict(data, unknown_fields=unknown_fields)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys) of the full spec with defaults filled in."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)


def load_spec_file(path: str, *, unknown_fields: str | None = None) -> JobSpec:
    """Read a spec from a JSON or YAML file (YAML needs PyYAML); ``unknown_fields`` as in :meth:`JobSpec.from_dict`.

    Raises:
        ConfigError: unreadable file, malformed JSON/YAML, or an invalid field.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read spec file {path!r}: {exc.strerror}", field="spec") from None
    except UnicodeDecodeError:
        raise ConfigError(f"spec file {path!r} is not UTF-8 text", field="spec") from None
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml  # type: ignore[import-untyped]
        except ImportError:  # pragma: no cover
            raise ConfigError("YAML specs need PyYAML (pip install pyyaml)", field="spec") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"malformed YAML in {path!r}: {exc}", field="spec") from None
        return JobSpec.from_dict(data, unknown_fields=unknown_fields)
    return JobSpec.from_json(text, unknown_fields=unknown_fields)


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a config dataclass, ``{field: text}``, for CLI help and API docs."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # pragma: no cover - source unavailable
        return {}
    body = ast.parse(source).body[0]
    docs: dict[str, str] = {}
    assert isinstance(body, ast.ClassDef)
    items = body.body
    for node, nxt in zip(items, items[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _bounds(cls: type) -> dict[str, dict[str, Any]]:
    """JSON-schema bounds of each field, read from the ``_check_*`` calls of ``cls.validate`` (the same checks that
    validate a spec, so the schema cannot drift from them): ``_check_int`` gives minimum/maximum,
    ``_check_ratio`` 0-1 (open ends exclusive), ``_check_positive`` exclusiveMinimum 0, ``_check_choice`` an
    enum (of the items, for a list field)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.validate)))  # type: ignore[attr-defined]
    except (OSError, TypeError, AttributeError):  # pragma: no cover - source unavailable
        return {}
    env = dict(globals())
    out: dict[str, dict[str, Any]] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) >= 2):
            continue
        fn, (where, value) = node.func.id, node.args[:2]
        if fn not in ("_check_int", "_check_ratio", "_check_positive", "_check_choice"):
            continue
        if isinstance(where, ast.Constant) and isinstance(where.value, str):  # a top-level field: "target_ratio"
            tail = "." + where.value
        elif isinstance(where, ast.JoinedStr):
            tail = "".join(p.value for p in where.values if isinstance(p, ast.Constant) and isinstance(p.value, str))
        else:
            continue
        m = re.match(r"^\.([a-z_]+)(\[)?", tail)
        if not m:
            continue
        name, item = (
            m.group(1),
            bool(m.group(2))
            or not (
                isinstance(value, ast.Attribute) and isinstance(value.value, ast.Name) and value.value.id == "self"
            ),
        )
        extra: dict[str, Any] = {}
        if fn == "_check_int":
            lo, hi = (eval(ast.unparse(a), env) for a in (*node.args[2:4],)) if len(node.args) >= 4 else (0, 2**31 - 1)
            extra = {"minimum": lo, "maximum": hi}
        elif fn == "_check_ratio":
            kw = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
            extra = {"exclusiveMinimum" if kw.get("low_open") else "minimum": 0}
            extra["exclusiveMaximum" if kw.get("high_open") else "maximum"] = 1
        elif fn == "_check_positive":
            extra = {"exclusiveMinimum": 0}
        elif fn == "_check_choice" and len(node.args) >= 3:
            extra = {"enum": list(eval(ast.unparse(node.args[2]), env))}
        out.setdefault(name, {}).update({"items": extra} if item else extra)
    return out


def _type_schema(hint: Any) -> dict[str, Any]:
    origin, args = get_origin(hint), get_args(hint)
    if origin is not None and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return {"anyOf": [_type_schema(inner[0]), {"type": "null"}]}
    if isinstance(hint, type) and issubclass(hint, _Section):
        return section_schema(hint)
    if origin in (list, tuple):
        return {"type": "array", "items": _type_schema(args[0]) if args else {}}
    if origin is dict:
        return {"type": "object", "additionalProperties": _type_schema(args[1]) if len(args) > 1 else {}}
    return {
        float: {"type": "number"},
        int: {"type": "integer"},
        bool: {"type": "boolean"},
        str: {"type": "string"},
    }.get(hint, {})


def section_schema(cls: type) -> dict[str, Any]:
    """JSON schema of a spec section (a config dataclass): every field with its type, default, bounds and the
    description its docstring gives; unknown fields are refused (``additionalProperties: false``) as the API does
    by default. The HTTP API's OpenAPI document uses it for each section of the job spec (issue 8)."""
    hints, docs, bounds = get_type_hints(cls), field_docs(cls), _bounds(cls)
    defaults = cls()  # type: ignore[call-arg]
    props: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name.startswith("_"):
            continue
        schema = _type_schema(hints[f.name])
        b = bounds.get(f.name, {})
        if b:
            item_bounds = b.pop("items", None)
            if "anyOf" in schema:
                schema["anyOf"][0].update(b)
            else:
                schema.update(b)
            if item_bounds and schema.get("type") == "array":
                schema["items"] = {**schema["items"], **item_bounds}
        default = _to_jsonable(getattr(defaults, f.name))
        if not (isinstance(default, dict) and schema.get("type") == "object" and "properties" in schema):
            schema["default"] = default
        if f.name in docs:
            schema["description"] = docs[f.name]
        props[f.name] = schema
    doc = inspect.getdoc(cls) or ""
    return {
        "type": "object",
        "title": cls.__name__,
        "description": " ".join(doc.split("\n\n")[0].split()),
        "properties": props,
        "additionalProperties": False,
    }
