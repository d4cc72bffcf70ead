"""Evaluation with stated protocols (ALGORITHM.md section 6): perplexity, zero-shot accuracy through lm-eval,
measured generation speed, and the one loss evaluator every stage shares.

:func:`evaluate` is the stage verb (:mod:`lorashear.evaluation.stage`). Importing this package is cheap (no torch):
the pre-flight checks import :mod:`lorashear.evaluation.tasks` where torch cannot be imported. Torch-backed names
load on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "EvaluationResult": "lorashear.evaluation.stage",
    "evaluate": "lorashear.evaluation.stage",
    "sample_text": "lorashear.evaluation.stage",
    "token_nll": "lorashear.evaluation.loss",
    "mean_loss": "lorashear.evaluation.loss",
    "window_batches": "lorashear.evaluation.loss",
    "Perplexity": "lorashear.evaluation.ppl",
    "perplexity": "lorashear.evaluation.ppl",
    "ZeroShotResult": "lorashear.evaluation.zeroshot",
    "run_zeroshot": "lorashear.evaluation.zeroshot",
    "zeroshot_section": "lorashear.evaluation.zeroshot",
    "zeroshot_metrics": "lorashear.evaluation.zeroshot",
    "paired_change": "lorashear.evaluation.zeroshot",
    "paired_section": "lorashear.evaluation.zeroshot",
    "combine_changes": "lorashear.evaluation.zeroshot",
    "SpeedResult": "lorashear.evaluation.speed",
    "measure_speed": "lorashear.evaluation.speed",
    "measure_speed_pair": "lorashear.evaluation.speed",
    "ideal_speedup": "lorashear.evaluation.speed",
    "compare_speed": "lorashear.evaluation.speed",
    "speed_section": "lorashear.evaluation.speed",
    "speed_metrics": "lorashear.evaluation.speed",
    "zeroshot_table": "lorashear.evaluation.tables",
    "speed_table": "lorashear.evaluation.tables",
    "check_tasks": "lorashear.evaluation.tasks",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lorashear.evaluation' has no attribute {name!r}")
