"""LHSPG progressive structured pruning (ALGORITHM.md section 3): the optimizer and the stage verb."""

from lorashear.optim.lhspg import LHSPG, spread
from lorashear.optim.prune import PruneResult, prune, set_quotas

__all__ = ["LHSPG", "PruneResult", "prune", "set_quotas", "spread"]
