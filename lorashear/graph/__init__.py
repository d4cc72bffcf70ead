"""Structure discovery: trace -> channel spaces -> minimally removable groups (LoRA-aware). ALGORITHM.md section 1."""

from lorashear.graph.structures import KINDS, SliceSpec, Structures, StructureSet, discover

__all__ = ["KINDS", "SliceSpec", "StructureSet", "Structures", "discover"]
