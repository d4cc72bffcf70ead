"""Model families the library can prune: one registration per family (standard library only).

A family tells the rest of the library what ``config.json`` cannot say by itself: which projections carry biases,
what the GGUF architecture name is, and whether the stock config class accepts a head count that does not divide
the hidden size (ALGORITHM.md section 1, "always write ``head_dim`` explicitly"; section 7). The budget, the
pre-flight, the GGUF reader and the export all read it from here, so a new LLaMA-family architecture is one
:func:`register_family` call, not edits in five files (issue 10).

The structure discovery itself does not consult the registry: it traces the model's computation and checks the
result against the config (ALGORITHM.md section 1, "Discovery").

Example::

    from lorashear.families import Family, register_family

    register_family(Family("my_llama", gguf_arch="my_llama", heads_must_divide_hidden=False))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lorashear.errors import UnsupportedModelError


def _attention_bias(cfg: dict[str, Any]) -> bool:
    return bool(cfg.get("attention_bias", False))


def _no(_cfg: dict[str, Any]) -> bool:
    return False


def _yes(_cfg: dict[str, Any]) -> bool:
    return True


@dataclass(frozen=True)
class Family:
    """What the library needs to know about one ``model_type``.

    Attributes:
        model_type: the ``config.json`` ``model_type`` (e.g. ``"llama"``).
        gguf_arch: ``general.architecture`` of GGUF files of this family, or ``None`` when GGUF input is not read.
        qkv_bias: ``config -> bool``: q/k/v projections carry a bias.
        o_bias: ``config -> bool``: the output projection carries a bias.
        mlp_bias: ``config -> bool``: gate/up/down projections carry a bias.
        heads_must_divide_hidden: the stock config class refuses ``hidden_size % num_attention_heads != 0`` even
            with an explicit ``head_dim`` (transformers 5's ``LlamaConfig`` does).
        export_as: ``model_type`` of a stock class that computes the same function and accepts any head count; a
            pruned model whose heads no longer divide the hidden size is re-expressed as it on export (bias-free
            models only). ``None``: the budget keeps such head counts out of reach instead.
    """

    model_type: str
    gguf_arch: str | None = None
    qkv_bias: Callable[[dict[str, Any]], bool] = field(default=_attention_bias)
    o_bias: Callable[[dict[str, Any]], bool] = field(default=_attention_bias)
    mlp_bias: Callable[[dict[str, Any]], bool] = field(default=lambda cfg: bool(cfg.get("mlp_bias", False)))
    heads_must_divide_hidden: bool = False
    export_as: str | None = None

    def needs_divisible_heads(self, has_bias: bool) -> bool:
        """True when a pruned head count must divide the hidden size (no stock class could load it otherwise)."""
        return self.heads_must_divide_hidden and (self.export_as is None or has_bias)


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family, *, replace: bool = False) -> Family:
    """Add a family to the registry.

    Raises:
        ValueError: ``family.model_type`` is registered already and ``replace`` is false.
    """
    if family.model_type in _FAMILIES and not replace:
        raise ValueError(f"model_type {family.model_type!r} is registered already")
    _FAMILIES[family.model_type] = family
    return family


def supported_model_types() -> tuple[str, ...]:
    """Registered ``model_type`` values, in registration order."""
    return tuple(_FAMILIES)


def get_family(model_type: Any, *, field: str = "model") -> Family:
    """The family of a ``model_type``.

    Raises:
        UnsupportedModelError: not registered; the message lists what is.
    """
    fam = _FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if fam is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(_FAMILIES)}", field=field
        )
    return fam


def family_for_gguf(arch: Any) -> Family:
    """The family whose GGUF ``general.architecture`` is ``arch``.

    Raises:
        UnsupportedModelError: no registered family reads that architecture.
    """
    for fam in _FAMILIES.values():
        if fam.gguf_arch is not None and fam.gguf_arch == arch:
            return fam
    raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported", field="model")


# LLaMA 1/2/3: LlamaConfig (transformers 5) refuses heads that do not divide the hidden size; a bias-free Llama is
# the same function as a Mistral without sliding window, so such a pruned model exports as MistralForCausalLM.
register_family(Family("llama", gguf_arch="llama", heads_must_divide_hidden=True, export_as="mistral"))
register_family(Family("mistral", gguf_arch="mistral", qkv_bias=_no, o_bias=_no, mlp_bias=_no))
# Qwen2: q/k/v always carry a bias, the output projection never does.
register_family(Family("qwen2", gguf_arch="qwen2", qkv_bias=_yes, o_bias=_no, mlp_bias=_no))

__all__ = ["Family", "family_for_gguf", "get_family", "register_family", "supported_model_types"]
