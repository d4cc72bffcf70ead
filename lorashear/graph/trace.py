"""Trace one forward pass and derive the coupled channel spaces from the autograd graph.

ALGORITHM.md section 1, "Discovery": the structures come from the model's own computation. Every ``nn.Linear``
and ``nn.Embedding`` (including PEFT's ``lora_A`` / ``lora_B`` linears) is a *unit*. Walking the autograd graph
backwards from each unit's input, through element-wise ops, reshapes, attention and residual adds, until other
units' outputs are reached, gives the unit's *producers*: the units whose output channels feed its input channels.
Consumers whose producer sets intersect read the same channel space (union-find), e.g.

* the hidden space: produced by the embedding and every ``o_proj`` / ``down_proj`` (and their ``lora_B``),
  consumed by every ``q/k/v/gate/up_proj`` (and their ``lora_A``) and ``lm_head``; norm weights sit on the path;
* an attention space per layer: produced by ``q/k/v_proj`` (+ ``lora_B``), consumed by ``o_proj`` (+ ``lora_A``);
* an MLP space per layer: produced by ``gate/up_proj`` (+ ``lora_B``), consumed by ``down_proj`` (+ ``lora_A``);
* a LoRA rank space per adapted linear: produced by ``lora_A``, consumed by ``lora_B``. The rank is never a
  structure ([code]): such spaces are recognised and dropped here.

Tracing runs with ``use_cache=False`` (a cache tuple has no ``grad_fn``; ALGORITHM.md section 7).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class Unit:
    """A linear or embedding module seen in the trace.

    Attributes:
        name: module name in the traced model.
        kind: ``linear`` or ``embedding``.
        lora: ``"A"`` / ``"B"`` for PEFT LoRA linears, else ``None``.
        out_features / in_features: sizes of the unit's output and input channel dims.
        order: position of the unit's first call in the forward pass.
    """

    name: str
    kind: str
    lora: str | None
    out_features: int
    in_features: int
    order: int
    module: nn.Module = field(repr=False)

    @property
    def layer(self) -> int | None:
        """Decoder layer index parsed from the module name (labels only; coupling comes from the trace)."""
        m = _LAYER_RE.search("." + self.name + ".")
        return int(m.group(1)) if m else None


@dataclass
class Space:
    """A channel space: the producers' output dims and the consumers' input dims that must be pruned together.

    Attributes:
        producers / consumers: unit names.
        leaves: parameters met on the paths between them (e.g. RMSNorm weights), by name.
        ops: autograd node names met on those paths (used to tell attention from MLP spaces).
        kind: ``hidden``, ``attention``, ``mlp`` or ``lora_rank``.
    """

    producers: list[str]
    consumers: list[str]
    leaves: list[str]
    ops: set[str]
    kind: str = ""


class _Stop(Exception):
    pass


def trace_units(model: nn.Module, input_ids: torch.Tensor) -> tuple[dict[str, Unit], list[Space]]:
    """Run one forward pass with every parameter requiring grad and derive units and spaces.

    Args:
        model: a causal LM (optionally PEFT-wrapped).
        input_ids: ``(1, T)`` token ids, a few tokens suffice.

    Returns:
        ``(units by name, spaces)``, spaces classified by :func:`classify`.
    """
    units: dict[str, Unit] = {}
    inputs: dict[str, torch.Tensor] = {}
    out_nodes: dict[object, str] = {}
    param_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    hooks = []

    def make_hook(name: str, mod: nn.Module):
        def hook(_m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if name in units:
                return
            out_f: int
            in_f: int
            if isinstance(mod, nn.Embedding):
                kind, out_f, in_f = "embedding", mod.embedding_dim, mod.num_embeddings
            else:
                kind, out_f, in_f = "linear", int(cast(Any, mod).out_features), int(cast(Any, mod).in_features)
            lora = "A" if ".lora_A." in name + "." else "B" if ".lora_B." in name + "." else None
            units[name] = Unit(name, kind, lora, out_f, in_f, len(units), mod)
            if kind == "linear" and isinstance(args[0], torch.Tensor):
                inputs[name] = args[0]
            if isinstance(out, torch.Tensor) and out.grad_fn is not None:
                out_nodes[out.grad_fn] = name

        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            hooks.append(mod.register_forward_hook(make_hook(name, mod)))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(True)
        with torch.enable_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])

    producers_of: dict[str, set[str]] = {}
    leaves_of: dict[str, set[str]] = {}
    ops_of: dict[str, set[str]] = {}
    for name, x in inputs.items():
        prods: set[str] = set()
        leaves: set[str] = set()
        ops: set[str] = set()
        seen: set[object] = set()
        stack = [x.grad_fn] if x.grad_fn is not None else []
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if node in out_nodes:
                prods.add(out_nodes[node])
                continue
            op = type(node).__name__
            if op == "AccumulateGrad":
                pname = param_names.get(id(cast(Any, node).variable))
                if pname is not None:
                    leaves.add(pname)
                continue
            ops.add(op)
            stack.extend(fn for fn, _ in node.next_functions if fn is not None)
        producers_of[name], leaves_of[name], ops_of[name] = prods, leaves, ops

    # union-find over consumers whose producer sets intersect
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    owner: dict[str, str] = {}
    for cons, prods in producers_of.items():
        find(cons)
        for prod in prods:
            if prod in owner:
                parent[find(cons)] = find(owner[prod])
            else:
                owner[prod] = cons
    groups: dict[str, list[str]] = {}
    for cons in producers_of:
        groups.setdefault(find(cons), []).append(cons)
    spaces = []
    for members in groups.values():
        ordered = sorted(set().union(*(producers_of[c] for c in members)), key=lambda n: units[n].order)
        if not ordered:
            continue
        space = Space(
            producers=ordered,
            consumers=sorted(members, key=lambda n: units[n].order),
            leaves=sorted(set().union(*(leaves_of[c] for c in members))),
            ops=set().union(*(ops_of[c] for c in members)),
        )
        space.kind = classify(space, units)
        spaces.append(space)
    return units, spaces


def classify(space: Space, units: dict[str, Unit]) -> str:
    """Name a space's kind from what the trace saw.

    * ``lora_rank``: every producer is a ``lora_A`` (the rank r: never prunable);
    * ``hidden``: an embedding produces it (the residual stream);
    * ``attention``: the paths cross an attention kernel or a softmax;
    * ``mlp``: otherwise (element-wise gating between producers and consumers);
    * ``unknown``: anything else (reported, never pruned).
    """
    if all(units[p].lora == "A" for p in space.producers):
        return "lora_rank"
    if any(units[p].kind == "embedding" for p in space.producers):
        return "hidden"
    if any("Attention" in op or "Softmax" in op for op in space.ops):
        return "attention"
    if any(units[c].lora == "B" for c in space.consumers):
        return "unknown"
    return "mlp"
