"""Per-layer (heterogeneous) models: decoder layers that keep different numbers of attention heads, KV groups and
MLP channels (issue 9, ``structures.layout: per_layer``).

Stock transformers classes give every layer the same widths (and their configs refuse per-layer sizes, including
transformers 5's own ``per_layer_config``), so a per-layer export needs a config and a model class of its own. For
each supported family (``llama``, ``mistral``, ``qwen2``) this module defines

* ``LoRAShear<Family>Config`` (``model_type`` ``lorashear_<family>``): the family's config plus three lists, one
  entry per layer: ``layer_num_attention_heads``, ``layer_num_key_value_heads`` and ``layer_intermediate_size``. The
  global ``num_attention_heads`` / ``num_key_value_heads`` / ``intermediate_size`` keep the unpruned sizes (the
  family's validation needs them; nothing reads them for the layer shapes), ``head_dim`` is explicit.
* ``LoRAShear<Family>ForCausalLM``: the family's causal LM whose layer ``i`` builds its attention and MLP from
  :meth:`layer_config` ``(i)``. Forward, generation and the KV cache are the family's own code: attention reshapes
  with ``-1`` heads and reads ``num_key_value_groups`` per module, and the dynamic cache sizes itself per layer.

:func:`register` adds both to ``AutoConfig`` / ``AutoModelForCausalLM``. ``import lorashear`` arranges for it to run
as soon as transformers' auto classes are imported (``lorashear`` itself stays torch-free at import), so
``AutoModelForCausalLM.from_pretrained(dir)`` loads a per-layer export with ``trust_remote_code`` off.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

LAYER_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
"""Config sizes that vary per layer; the config stores each as ``layer_<key>``, a list with one entry per layer."""

_FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "Llama"),
    "mistral": ("mistral", "Mistral"),
    "qwen2": ("qwen2", "Qwen2"),
}
"""``model_type`` -> (transformers package, class prefix) of the families with a per-layer class."""


@dataclass(frozen=True)
class PerLayerClasses:
    """The registered pair of one family."""

    model_type: str
    config_class: type
    model_class: type


_CONFIGS: dict[str, type] = {}
_CLASSES: dict[str, PerLayerClasses] = {}


def _check_family(family: str) -> None:
    if family not in _FAMILIES:
        raise ValueError(f"no per-layer class for model_type {family!r}; supported: {', '.join(_FAMILIES)}")


def model_type_for(family: str) -> str:
    """``model_type`` of the per-layer variant of ``family`` (e.g. ``lorashear_llama``)."""
    return f"lorashear_{family}"


def config_class(family: str) -> type:
    """The per-layer config class of ``family`` (built once, from the configuration module only).

    Raises:
        ValueError: the family has no per-layer class.
    """
    _check_family(family)
    if family not in _CONFIGS:
        _CONFIGS[family] = _build_config(family)
    return _CONFIGS[family]


def _build_config(family: str) -> type:
    from huggingface_hub.dataclasses import strict

    package, prefix = _FAMILIES[family]
    base_config = getattr(
        importlib.import_module(f"transformers.models.{package}.configuration_{package}"), f"{prefix}Config"
    )
    model_type = model_type_for(family)

    def layer_config(self: Any, i: int) -> Any:
        """A copy of this config with layer ``i``'s sizes in the global fields (what the family's modules read)."""
        cfg = copy.copy(self)
        for key in LAYER_KEYS:
            values = getattr(self, f"layer_{key}")
            if values is not None:
                object.__setattr__(cfg, key, int(values[i]))
        return cfg

    def validate_layers(self: Any) -> None:
        """Part of ``@strict`` validation: one entry per layer, positive sizes, heads a multiple of KV heads."""
        n = self.num_hidden_layers
        for key in LAYER_KEYS:
            values = getattr(self, f"layer_{key}")
            if values is None:
                continue
            if len(values) != n or any(int(v) < 1 for v in values):
                raise ValueError(f"layer_{key} must list {n} positive sizes, got {values!r}")
        heads, kv = self.layer_num_attention_heads, self.layer_num_key_value_heads
        if heads is not None and kv is not None and any(h % k for h, k in zip(heads, kv, strict=True)):
            raise ValueError(f"layer_num_attention_heads {heads} must be multiples of layer_num_key_value_heads {kv}")

    namespace: dict[str, Any] = {
        "__module__": __name__,
        "__doc__": f"{prefix} config with per-layer attention heads, KV heads and MLP channels (lorashear).",
        "__annotations__": {
            "layer_num_attention_heads": "list[int] | None",
            "layer_num_key_value_heads": "list[int] | None",
            "layer_intermediate_size": "list[int] | None",
        },
        "model_type": model_type,
        "layer_num_attention_heads": None,
        "layer_num_key_value_heads": None,
        "layer_intermediate_size": None,
        "layer_config": layer_config,
        "validate_layers": validate_layers,
    }
    return cast(type, strict(type(f"LoRAShear{prefix}Config", (base_config,), namespace)))


def _build(family: str) -> PerLayerClasses:
    package, prefix = _FAMILIES[family]
    mod = importlib.import_module(f"transformers.models.{package}.modeling_{package}")
    base_lm = getattr(mod, f"{prefix}ForCausalLM")
    attention_cls = getattr(mod, f"{prefix}Attention")
    mlp_cls = getattr(mod, f"{prefix}MLP")
    cfg_class = config_class(family)

    def __init__(self: Any, config: Any) -> None:  # noqa: N807 - a method body
        base_lm.__init__(self, config)
        for i, layer in enumerate(self.model.layers):
            cfg = config.layer_config(i)
            layer.self_attn = attention_cls(cfg, i)
            layer.mlp = mlp_cls(cfg)
        self.post_init()

    model_class = type(
        f"LoRAShear{prefix}ForCausalLM",
        (base_lm,),
        {
            "__module__": __name__,
            "__doc__": f"{prefix} causal LM whose layers have their own widths (lorashear per-layer export).",
            "config_class": cfg_class,
            "__init__": __init__,
        },
    )
    return PerLayerClasses(model_type_for(family), cfg_class, model_class)


def classes(family: str) -> PerLayerClasses:
    """The per-layer config and model classes of ``family`` (built once).

    Raises:
        ValueError: the family has no per-layer class.
    """
    _check_family(family)
    if family not in _CLASSES:
        _CLASSES[family] = _build(family)
    return _CLASSES[family]


def register_configs() -> None:
    """Register every per-layer config class with ``AutoConfig`` (idempotent; replaces the placeholders of
    :mod:`lorashear._autoregister`)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for family in _FAMILIES:
        cls = config_class(family)
        if CONFIG_MAPPING._extra_content.get(model_type_for(family)) is not cls:  # absent, or lorashear's placeholder
            AutoConfig.register(model_type_for(family), cls, exist_ok=True)


def register() -> None:
    """Register the per-layer configs with ``AutoConfig`` and models with ``AutoModelForCausalLM`` (idempotent)."""
    from transformers import AutoModelForCausalLM

    register_configs()
    mapping = cast(Any, AutoModelForCausalLM)._model_mapping
    for family in _FAMILIES:
        c = classes(family)
        if c.config_class not in mapping._extra_content:
            AutoModelForCausalLM.register(c.config_class, c.model_class)


def layer_sizes(model: nn.Module) -> dict[str, list[int]]:
    """Per-layer sizes read from the weights: ``{key: [size per layer]}`` for :data:`LAYER_KEYS`.

    Raises:
        ValueError: the model has no decoder layers (modules with ``self_attn`` and ``mlp``).
    """
    cfg: Any = model.config
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    out: dict[str, list[int]] = {k: [] for k in LAYER_KEYS}
    layers: list[Any] = [m for m in model.modules() if hasattr(m, "self_attn") and hasattr(m, "mlp")]
    for layer in layers:
        q = getattr(layer.self_attn.q_proj, "base_layer", layer.self_attn.q_proj)
        k = getattr(layer.self_attn.k_proj, "base_layer", layer.self_attn.k_proj)
        g = getattr(layer.mlp.gate_proj, "base_layer", layer.mlp.gate_proj)
        out["num_attention_heads"].append(q.weight.shape[0] // head_dim)
        out["num_key_value_heads"].append(k.weight.shape[0] // head_dim)
        out["intermediate_size"].append(g.weight.shape[0])
    if not layers:
        raise ValueError("the model has no decoder layers")
    return out


def is_uniform(model: nn.Module) -> bool:
    """True when every decoder layer has the same attention heads, KV heads and MLP channels."""
    return all(len(set(v)) == 1 for v in layer_sizes(model).values())


def as_per_layer(model: nn.Module) -> nn.Module:
    """Re-express a plain (non-PEFT) family model whose layers differ in width as the family's per-layer class.

    The weights are moved, not copied (the result shares them); names are unchanged, so ``save_pretrained``
    writes the same tensors under the same keys.

    Args:
        model: a ``llama`` / ``mistral`` / ``qwen2`` causal LM (after slicing: its config may name layer 0's sizes).
            The global ``num_attention_heads`` / ``intermediate_size`` recorded are the largest per-layer sizes
            (heads raised to a divisor of ``hidden_size``, which the family's validation wants; nothing reads them).

    Raises:
        ValueError: an unsupported family.
    """
    cfg: Any = model.config
    family = cfg.model_type.removeprefix("lorashear_")
    c = classes(family)
    sizes = layer_sizes(model)
    src = {k: v for k, v in cfg.to_dict().items() if not k.startswith("layer_")}
    for key in ("model_type", "architectures", "transformers_version", "dtype", "torch_dtype"):
        src.pop(key, None)
    heads = max(sizes["num_attention_heads"])
    while cfg.hidden_size % heads:  # the family's validation wants heads | hidden; the value is not used
        heads += 1
    src.update(num_attention_heads=heads, num_key_value_heads=1, intermediate_size=max(sizes["intermediate_size"]))
    src.update({f"layer_{k}": v for k, v in sizes.items()})
    new_cfg = c.config_class(**src)
    return rebuild(model, new_cfg, c.model_class)


def rebuild(model: nn.Module, config: Any, model_class: Any) -> nn.Module:
    """``model``'s weights in a new ``model_class(config)`` with the same parameter names, moved (not copied).

    The new model is built on the meta device and takes the tensors by assignment; non-persistent buffers (RoPE
    ``inv_freq``) are copied over, and tied embeddings are re-tied. Used to re-express a pruned model as another
    class that computes the same function (:func:`as_per_layer`, :func:`lorashear.compression.stock_loadable`).

    Raises:
        RuntimeError: the parameter names or shapes differ (``load_state_dict`` strict).
    """
    config.dtype = cast(Any, model).dtype
    with torch.device("meta"):
        out = model_class(config)
    out.load_state_dict(model.state_dict(), strict=True, assign=True)
    source_buffers = dict(model.named_buffers())
    for name, buf in list(out.named_buffers()):  # non-persistent buffers (RoPE inv_freq) are not in state_dict
        if buf.is_meta:
            owner, _, attr = name.rpartition(".")
            out.get_submodule(owner)._buffers[attr] = source_buffers[name].detach().clone()
    if config.tie_word_embeddings:
        out.tie_weights()
    return cast(nn.Module, out.eval())


__all__ = ["LAYER_KEYS", "as_per_layer", "classes", "is_uniform", "layer_sizes", "model_type_for", "register"]
