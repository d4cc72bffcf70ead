"""Make per-layer exports loadable by transformers' auto classes without importing transformers early.

``import lorashear`` must stay cheap (no torch, no transformers), yet a per-layer export must load with
``AutoModelForCausalLM.from_pretrained`` once ``lorashear`` is imported (issue 9). Registering the real classes
while transformers is importing itself is fragile (they subclass modules that may be half-initialised at that
moment), so :func:`install` registers *placeholders*: as soon as ``transformers.models.auto.configuration_auto`` has
executed (now, if it already has; otherwise through a finder on ``sys.meta_path`` that wraps that one module's
loader and finds nothing itself), each ``lorashear_<family>`` model type maps to a placeholder config class that
imports nothing. The first time transformers builds such a config (``from_dict`` or a call), the placeholder runs
:func:`lorashear.per_layer.register`, which replaces it with the real config class and registers the model class
with ``AutoModelForCausalLM``; that happens inside ``from_pretrained``, when importing is safe.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

CONFIG_AUTO = "transformers.models.auto.configuration_auto"
FAMILIES = ("llama", "mistral", "qwen2")
"""Families with a per-layer class (:data:`lorashear.per_layer._FAMILIES` holds the same keys)."""


def _placeholders() -> None:
    from transformers.configuration_utils import PreTrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    extra = CONFIG_MAPPING._extra_content
    for family in FAMILIES:
        model_type = f"lorashear_{family}"
        if model_type in extra:
            continue

        def real(family: str = family) -> Any:
            from lorashear import per_layer

            per_layer.register()
            return per_layer.config_class(family)

        class Placeholder(PreTrainedConfig):
            __doc__ = f"Stands for the per-layer {family} config until transformers first builds one."

            def __new__(cls, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
                return _real()(*args, **kwargs)

            @classmethod
            def from_dict(cls, config_dict: dict[str, Any], _real: Any = real, **kwargs: Any) -> Any:
                return _real().from_dict(config_dict, **kwargs)

        Placeholder.model_type = model_type
        Placeholder.__name__ = Placeholder.__qualname__ = f"LoRAShear{family.capitalize()}ConfigPlaceholder"
        extra[model_type] = Placeholder


class _AfterConfigAuto(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of ``configuration_auto`` to add the placeholders after it ran."""

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> Any:
        if fullname != CONFIG_AUTO:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        execute = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            _placeholders()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Register the placeholders now if transformers' config registry is loaded, else when it loads."""
    if CONFIG_AUTO in sys.modules:
        _placeholders()
    elif not any(isinstance(f, _AfterConfigAuto) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterConfigAuto())
