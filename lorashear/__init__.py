"""LoRAShear: structured pruning and knowledge recovery for LoRA-adapted LLaMA-family models.

Importing the package is cheap: it imports neither torch nor transformers and prints nothing. Torch-backed names
(``run``, ``discover``, ...) load on first access. Importing it also registers the per-layer model classes
(:mod:`lorashear.per_layer`) with transformers' auto classes once those are imported, so per-layer exports load
with ``AutoModelForCausalLM.from_pretrained``.

Paper: Chen et al., "LoRAShear: Efficient Large Language Model Structured Pruning and Knowledge Recovery",
arXiv 2310.18356 (2023).
"""

from __future__ import annotations

import importlib
from typing import Any

from lorashear._autoregister import install as _install_auto_registration
from lorashear.config import JobSpec, load_spec_file
from lorashear.errors import (
    AdapterMismatchError,
    Cancelled,
    ConfigError,
    DataError,
    LoRAShearError,
    TargetNotExpressibleError,
    UnsupportedModelError,
)

__version__ = "0.1.0"
_install_auto_registration()

_LAZY = {
    # the pipeline and its stage verbs, in order (README, "Library")
    "run": "lorashear.pipeline",
    "RunResult": "lorashear.report",
    "load": "lorashear.inputs",
    "discover": "lorashear.graph",
    "plan_quotas": "lorashear.budget",
    "analyze": "lorashear.analysis",
    "prune": "lorashear.optim",
    "set_quotas": "lorashear.optim",
    "compress": "lorashear.compression",
    "reconstruct": "lorashear.recovery",
    "recover": "lorashear.recovery",
    "recovery_stages": "lorashear.recovery",
    "evaluate": "lorashear.evaluation",
    "export": "lorashear.compression",
    # building blocks
    "perplexity": "lorashear.evaluation",
    "load_model": "lorashear.modeling",
    "apply_plan": "lorashear.compression",
    "register_family": "lorashear.families",
}

__all__ = [
    "AdapterMismatchError",
    "Cancelled",
    "ConfigError",
    "DataError",
    "JobSpec",
    "LoRAShearError",
    "TargetNotExpressibleError",
    "UnsupportedModelError",
    "load_spec_file",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lorashear' has no attribute {name!r}")
