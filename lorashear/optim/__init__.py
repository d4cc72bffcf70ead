"""LHSPG and its saliency criteria (ALGORITHM.md section 3)."""

from lorashear.optim.lhspg import LHSPG, spread
from lorashear.optim.saliency import group_stats, lora_refs, saliency

__all__ = ["LHSPG", "group_stats", "lora_refs", "saliency", "spread"]
