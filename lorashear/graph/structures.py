"""Minimally removable structures (node groups) built from the traced spaces and checked by probes.

ALGORITHM.md section 1. The trace (:mod:`lorashear.graph.trace`) says which units share a channel space; it cannot
see how a reshape into heads maps channels (the "small per-family rule" the brief allows). The head rule used here
is the LLaMA family's (``head_dim`` channels per head, query head ``h`` reads KV head ``h // n_rep``), taken from
the config, and then *checked on the model itself* by output probes, batched one forward pass per layer:

* zeroing KV head ``j``'s ``k``/``v`` rows must zero exactly the ``o_proj`` input columns of the query heads that
  read it (zero-invariance, the property compression relies on);
* replacing query head ``h``'s ``q`` outputs by noise must change only its own ``o_proj`` input columns (and at
  least half of them: a ``v`` column constant over tokens cannot change);
* zeroing a random set of ``gate_proj`` (or ``up_proj``) channels must zero exactly those ``down_proj`` inputs;
* zeroing hidden dims in every producer of the residual stream must zero exactly those dims at every consumer.

A disagreement raises :class:`UnsupportedModelError` instead of pruning a model we do not understand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from lorashear.budget import ModelShape
from lorashear.config import StructureConfig
from lorashear.errors import UnsupportedModelError
from lorashear.graph.trace import Space, Unit, trace_units

KINDS = ("attention_head", "kv_group", "query_head", "mlp_channel", "hidden_dim")
"""Structure kinds: MHA heads, GQA KV groups, query heads inside KV groups, MLP channels, hidden dimensions."""


@dataclass
class SliceSpec:
    """One tensor slice of every group of a :class:`StructureSet`.

    Attributes:
        param: parameter name in the traced (PEFT) model.
        dim: tensor dim the indices select (0 = rows / output channels of a linear, 1 = columns / inputs;
            embedding weights use dim 1 for the hidden dim; 1-D tensors use 0).
        index: ``(n_groups, k)`` indices of each group's ``k`` rows/columns.
        zero: LHSPG drives this slice to exactly zero (producers; for query heads the consumer too).
        lora: ``"A"``, ``"B"`` or ``None`` (base weight or bias).
        role: ``producer`` (output side) or ``consumer`` (input side); both are deleted at compression.
    """

    param: str
    dim: int
    index: torch.Tensor
    zero: bool
    lora: str | None
    role: str


@dataclass
class StructureSet:
    """All groups of one kind in one layer (``layer=None`` for the model-wide hidden dimension).

    Attributes:
        kind: one of :data:`KINDS`.
        layer: decoder layer index.
        n_groups: number of groups G.
        slices: the slices each group owns, one :class:`SliceSpec` per tensor.
        params_per_group: base (non-LoRA) parameters one group holds.
        cluster: ``(G,)`` quota partition of each group (query heads: their KV group; else 0).
        protected: ``(G,)`` True where the knowledge-distribution analysis marked a group unprunable.
        prunable: False when the user disabled this kind.
        meta: sizes used by the rules (``head_dim``, ``n_rep``, module names by role).
    """

    kind: str
    layer: int | None
    n_groups: int
    slices: list[SliceSpec]
    params_per_group: int
    cluster: torch.Tensor
    protected: torch.Tensor
    prunable: bool = True
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Stable id, e.g. ``kv_group@3`` or ``hidden_dim``."""
        return self.kind if self.layer is None else f"{self.kind}@{self.layer}"


@dataclass
class Structures:
    """Result of discovery: structure sets plus what the trace saw.

    Attributes:
        sets: every :class:`StructureSet`, attention before MLP, layer order.
        shape: model sizes (from the config, verified against the trace).
        spaces: summary of the traced spaces by kind (counts), for reports.
        checks: names of the probe checks that passed.
    """

    sets: list[StructureSet]
    shape: ModelShape
    spaces: dict[str, int]
    checks: list[str]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def by_key(self) -> dict[str, StructureSet]:
        """Sets by :attr:`StructureSet.key`."""
        return {s.key: s for s in self.sets}

    def summary(self) -> list[dict[str, Any]]:
        """Per set: kind, layer, groups, parameters per group, prunable, protected count."""
        return [
            {
                "kind": s.kind,
                "layer": s.layer,
                "groups": s.n_groups,
                "params_per_group": s.params_per_group,
                "prunable": s.prunable,
                "protected": int(s.protected.sum()),
            }
            for s in self.sets
        ]


def _prefix(unit: Unit) -> str:
    """Name of the adapted linear a unit belongs to (PEFT nests ``base_layer``, ``lora_A.<name>``, ``lora_B``)."""
    n = unit.name
    for marker in (".base_layer", ".lora_A.", ".lora_B."):
        if marker in n + ".":
            return n.split(marker)[0] if marker != ".base_layer" else n[: n.rindex(".base_layer")]
    return n


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters(remove_duplicate=False))


def _blocks(idx: list[list[int]]) -> torch.Tensor:
    return torch.tensor(idx, dtype=torch.long)


class _Stop(Exception):
    pass


def _run_probes(
    model: nn.Module,
    input_ids: torch.Tensor,
    perturb: dict[nn.Module, list[tuple[int, torch.Tensor, float]]],
    capture: list[nn.Module],
    stop_after: nn.Module | None,
) -> dict[nn.Module, torch.Tensor]:
    """One batched forward pass; batch element ``b`` zeroes (``factor`` 0) or replaces by noise of ``factor`` times
    the activations' scale the listed output channels of a module.

    Returns the captured inputs of the ``capture`` modules, ``(B, T, in_features)`` each.
    """
    got: dict[nn.Module, torch.Tensor] = {}
    hooks = []

    def out_hook(mod: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        for b, idx, factor in perturb[mod]:
            if factor == 0.0:
                out[b, :, idx] = 0
            else:  # replace by noise well above the activations' scale
                g = torch.Generator(device="cpu").manual_seed(int(b))
                noise = torch.randn(out[b, :, idx].shape, generator=g).to(out.device, out.dtype)
                out[b, :, idx] = noise * factor * out.detach().float().std().clamp(min=1e-3).to(out.dtype)
        return out

    def in_hook(mod: nn.Module, args: tuple) -> None:
        got[mod] = args[0].detach().clone()
        if mod is stop_after:
            raise _Stop

    for mod in perturb:
        hooks.append(mod.register_forward_hook(out_hook))
    for mod in capture:
        hooks.append(mod.register_forward_pre_hook(in_hook))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    return got


def _zero_cols(x: torch.Tensor) -> set[int]:
    return set(torch.nonzero((x == 0).all(dim=0)).flatten().tolist())


def _zeroes_exactly(x: torch.Tensor, base: torch.Tensor, want: set[int]) -> bool:
    """``want`` became zero, and nothing else did (columns already zero in the baseline are ignored)."""
    z, z0 = _zero_cols(x), _zero_cols(base)
    return want <= z and (z - z0) <= want


def _changed_cols(x: torch.Tensor, base: torch.Tensor) -> set[int]:
    tol = 1e-6 * float(base.abs().max().clamp(min=1.0))
    return set(torch.nonzero(((x - base).abs() > tol).any(dim=0)).flatten().tolist())


def discover(
    model: nn.Module,
    cfg: StructureConfig | None = None,
    *,
    shape: ModelShape | None = None,
    attention: bool = True,
    mlp: bool = True,
    hidden: bool = False,
    probe_ids: torch.Tensor | None = None,
    seed: int = 0,
) -> Structures:
    """Find the minimally removable structures of a (PEFT-wrapped) LLaMA-family model (the discovery stage).

    Args:
        model: the model, with or without LoRA; weights are not changed.
        cfg: which kinds are prunable (``structures`` section of a spec); overrides ``attention``/``mlp``/``hidden``.
        shape: sizes from the config (read from ``model.config`` when omitted); the trace is checked against them.
        attention / mlp / hidden: which kinds are marked prunable (all are discovered and reported).
        probe_ids: ``(1, T)`` token ids for the trace and the probes (defaults to 6 fixed ids).
        seed: seed of the random channel subsets the MLP and hidden probes use.

    Returns:
        :class:`Structures`, with ``protected`` all False (the analysis fills it in).

    Raises:
        UnsupportedModelError: the trace or a probe disagrees with the config (unknown wiring).
    """
    if cfg is not None:
        attention, mlp, hidden = cfg.attention, cfg.mlp, cfg.hidden
    if shape is None:
        shape = ModelShape.from_config(cast(Any, model).config.to_dict())
    device = next(model.parameters()).device
    if probe_ids is None:
        probe_ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    probe_ids = probe_ids.to(device)
    was_training = model.training
    model.eval()
    try:
        units, spaces = trace_units(model, probe_ids)
        return _build(model, units, spaces, shape, attention, mlp, hidden, probe_ids, seed)
    finally:
        model.train(was_training)


@dataclass
class _Ctx:
    """What every set builder needs: the model, the trace, the config sizes, the probe input, check log."""

    model: nn.Module
    units: dict[str, Unit]
    shape: ModelShape
    probe_ids: torch.Tensor
    params: dict[str, torch.Tensor]
    gen: torch.Generator
    checks: list[str]


def _mismatch(msg: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"structure discovery: {msg}", field="model")


def _build(
    model: nn.Module,
    units: dict[str, Unit],
    spaces: list[Space],
    shape: ModelShape,
    attention: bool,
    mlp: bool,
    hidden: bool,
    probe_ids: torch.Tensor,
    seed: int,
) -> Structures:
    params = _params(model)
    counts: dict[str, int] = {}
    for sp in spaces:
        counts[sp.kind] = counts.get(sp.kind, 0) + 1
    attn_spaces = [s for s in spaces if s.kind == "attention"]
    mlp_spaces = [s for s in spaces if s.kind == "mlp"]
    hidden_spaces = [s for s in spaces if s.kind == "hidden"]
    if counts.get("unknown"):
        raise _mismatch(f"{counts['unknown']} channel space(s) of unknown kind")
    if len(attn_spaces) != shape.num_layers or len(mlp_spaces) != shape.num_layers or len(hidden_spaces) != 1:
        raise _mismatch(
            f"traced {len(attn_spaces)} attention and {len(mlp_spaces)} MLP spaces and {len(hidden_spaces)} hidden "
            f"spaces, config says {shape.num_layers} layers"
        )
    checks: list[str] = []
    sets: list[StructureSet] = []
    ctx = _Ctx(model, units, shape, probe_ids, params, torch.Generator().manual_seed(seed), checks)
    for layer, sp in enumerate(attn_spaces):
        sets.extend(_attention_sets(ctx, sp, layer, attention))
    for layer, sp in enumerate(mlp_spaces):
        sets.append(_mlp_set(ctx, sp, layer, mlp))
    sets.append(_hidden_set(ctx, hidden_spaces[0], hidden))
    used = {sl.param for s in sets for sl in s.slices}
    return Structures(sets, shape, counts, checks, {n: tuple(params[n].shape) for n in used})


def _split(units: dict[str, Unit], sp: Space) -> tuple[list[Unit], dict[str, Unit], list[Unit], dict[str, Unit]]:
    """Base producers, their lora_B by prefix, base consumers, their lora_A by prefix."""
    prod = [units[n] for n in sp.producers if units[n].lora is None]
    prod_b = {_prefix(units[n]): units[n] for n in sp.producers if units[n].lora == "B"}
    cons = [units[n] for n in sp.consumers if units[n].lora is None]
    cons_a = {_prefix(units[n]): units[n] for n in sp.consumers if units[n].lora == "A"}
    return prod, prod_b, cons, cons_a


def _row_slices(
    u: Unit, b: Unit | None, idx: torch.Tensor, params: dict[str, torch.Tensor], zero: bool
) -> list[SliceSpec]:
    out = [SliceSpec(f"{u.name}.weight", 0, idx, zero, None, "producer")]
    if f"{u.name}.bias" in params:
        out.append(SliceSpec(f"{u.name}.bias", 0, idx, zero, None, "producer"))
    if b is not None:
        out.append(SliceSpec(f"{b.name}.weight", 0, idx, zero, "B", "producer"))
    return out


def _col_slices(u: Unit, a: Unit | None, idx: torch.Tensor, zero: bool) -> list[SliceSpec]:
    out = [SliceSpec(f"{u.name}.weight", 1, idx, zero, None, "consumer")]
    if a is not None:
        out.append(SliceSpec(f"{a.name}.weight", 1, idx, zero, "A", "consumer"))
    return out


def _base_params_per_group(slices: list[SliceSpec], params: dict[str, torch.Tensor]) -> int:
    seen: set[int] = set()
    total = 0
    for s in slices:
        p = params[s.param]
        if s.lora is not None or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        other = p.numel() // p.shape[s.dim]
        total += s.index.shape[1] * other
    return total


def _attention_sets(ctx: _Ctx, sp: Space, layer: int, prunable: bool) -> list[StructureSet]:
    model, units, shape, params = ctx.model, ctx.units, ctx.shape, ctx.params
    hd, rep, nh, nkv = shape.head_dim, shape.n_rep, shape.num_heads, shape.num_kv_heads
    prod, prod_b, cons, cons_a = _split(units, sp)
    if len(cons) != 1 or cons[0].in_features != nh * hd:
        raise _mismatch(f"layer {layer}: attention output projection does not take {nh} x {hd} inputs")
    o = cons[0]
    if rep == 1:
        if len(prod) != 3 or any(u.out_features != nh * hd for u in prod):
            raise _mismatch(f"layer {layer}: expected 3 attention input projections of {nh} x {hd}, traced {len(prod)}")
        q, kv_like = prod[0], prod[1:]  # with MHA the three play the same role for every probe
    else:
        q_like = [u for u in prod if u.out_features == nh * hd]
        kv_like = [u for u in prod if u.out_features == nkv * hd]
        if len(q_like) != 1 or len(kv_like) != 2:
            raise _mismatch(
                f"layer {layer}: expected 1 query and 2 key/value projections, traced {len(prod)} producers"
            )
        q = q_like[0]

    # probes: b=0 baseline; 1..nkv zero KV head j (k and v rows); then perturb each query head's q rows
    def mods(u: Unit) -> list[nn.Module]:
        b = prod_b.get(_prefix(u))
        return [u.module] + ([b.module] if b is not None else [])

    perturb: dict[nn.Module, list[tuple[int, torch.Tensor, float]]] = {}
    for u in prod:
        for m in mods(u):
            perturb.setdefault(m, [])
    for j in range(nkv):
        rows = torch.arange(j * hd, (j + 1) * hd)
        for u in kv_like:
            for m in mods(u):
                perturb[m].append((1 + j, rows, 0.0))
        if rep == 1:  # MHA: the group zeroes q rows too
            for m in mods(q):
                perturb[m].append((1 + j, rows, 0.0))
    for h in range(nh):
        rows = torch.arange(h * hd, (h + 1) * hd)
        for m in mods(q):
            perturb[m].append((1 + nkv + h, rows, 3.0))
    batch = ctx.probe_ids.expand(1 + nkv + nh, -1)
    got = _run_probes(model, batch, perturb, [o.module], o.module)[o.module]  # (B, T, nh*hd)
    base = got[0]
    for j in range(nkv):
        want = {c for h in range(j * rep, (j + 1) * rep) for c in range(h * hd, (h + 1) * hd)}
        if not _zeroes_exactly(got[1 + j], base, want):
            raise _mismatch(f"layer {layer}: zeroing KV head {j} did not zero exactly its query heads' outputs")
    for h in range(nh):
        want = set(range(h * hd, (h + 1) * hd))
        changed = _changed_cols(got[1 + nkv + h], base)
        if not changed <= want or len(changed) < len(want) // 2:
            raise _mismatch(f"layer {layer}: query head {h} does not map to its {hd} output channels")
    ctx.checks.append(f"attention@{layer}: {nkv} KV heads x {rep} query heads x head_dim {hd} verified")

    o_a = cons_a.get(_prefix(o))
    sets = []
    group_kind = "attention_head" if rep == 1 else "kv_group"
    q_rows = _blocks(
        [[c for h in range(j * rep, (j + 1) * rep) for c in range(h * hd, (h + 1) * hd)] for j in range(nkv)]
    )
    kv_rows = _blocks([list(range(j * hd, (j + 1) * hd)) for j in range(nkv)])
    slices: list[SliceSpec] = []
    slices += _row_slices(q, prod_b.get(_prefix(q)), q_rows, params, True)
    for u in kv_like:
        slices += _row_slices(u, prod_b.get(_prefix(u)), kv_rows, params, True)
    slices += _col_slices(o, o_a, q_rows, False)
    meta = {"head_dim": hd, "n_rep": rep, "q": q.name, "kv": [u.name for u in kv_like], "o": o.name}
    sets.append(
        StructureSet(
            group_kind,
            layer,
            nkv,
            slices,
            _base_params_per_group(slices, params),
            torch.zeros(nkv, dtype=torch.long),
            torch.zeros(nkv, dtype=torch.bool),
            prunable,
            meta,
        )
    )
    if rep > 1:
        h_rows = _blocks([list(range(h * hd, (h + 1) * hd)) for h in range(nh)])
        qs = _row_slices(q, prod_b.get(_prefix(q)), h_rows, params, True) + _col_slices(o, o_a, h_rows, True)
        sets.append(
            StructureSet(
                "query_head",
                layer,
                nh,
                qs,
                _base_params_per_group(qs, params),
                torch.arange(nh) // rep,
                torch.zeros(nh, dtype=torch.bool),
                prunable,
                meta,
            )
        )
    return sets


def _mlp_set(ctx: _Ctx, sp: Space, layer: int, prunable: bool) -> StructureSet:
    model, units, shape, params = ctx.model, ctx.units, ctx.shape, ctx.params
    inter = shape.intermediate_size
    prod, prod_b, cons, cons_a = _split(units, sp)
    if len(cons) != 1 or cons[0].in_features != inter or len(prod) != 2 or any(u.out_features != inter for u in prod):
        raise _mismatch(f"layer {layer}: MLP wiring differs from gate/up -> down with {inter} channels")
    down = cons[0]
    perturb: dict[nn.Module, list[tuple[int, torch.Tensor, float]]] = {}
    subsets = []
    for i, u in enumerate(prod):
        sub = torch.randperm(inter, generator=ctx.gen)[: max(1, inter // 3)]
        subsets.append(set(sub.tolist()))
        for m in [u.module] + ([prod_b[_prefix(u)].module] if _prefix(u) in prod_b else []):
            perturb.setdefault(m, []).append((1 + i, sub, 0.0))
    got = _run_probes(model, ctx.probe_ids.expand(1 + len(prod), -1), perturb, [down.module], down.module)[down.module]
    for i, u in enumerate(prod):
        if not _zeroes_exactly(got[1 + i], got[0], subsets[i]):
            raise _mismatch(f"layer {layer}: zeroing {u.name} channels does not zero the same down_proj inputs")
    ctx.checks.append(f"mlp@{layer}: {inter} channels, zero-invariance of both input projections verified")
    idx = torch.arange(inter).unsqueeze(1)
    slices: list[SliceSpec] = []
    for u in prod:
        slices += _row_slices(u, prod_b.get(_prefix(u)), idx, params, True)
    slices += _col_slices(down, cons_a.get(_prefix(down)), idx, False)
    meta = {"gate_up": [u.name for u in prod], "down": down.name}
    return StructureSet(
        "mlp_channel",
        layer,
        inter,
        slices,
        _base_params_per_group(slices, params),
        torch.zeros(inter, dtype=torch.long),
        torch.zeros(inter, dtype=torch.bool),
        prunable,
        meta,
    )


def _hidden_set(ctx: _Ctx, sp: Space, prunable: bool) -> StructureSet:
    model, units, shape, params = ctx.model, ctx.units, ctx.shape, ctx.params
    h = shape.hidden_size
    prod, prod_b, cons, cons_a = _split(units, sp)
    sub = torch.randperm(h, generator=ctx.gen)[: max(1, h // 4)]
    perturb: dict[nn.Module, list[tuple[int, torch.Tensor, float]]] = {}
    for u in prod:
        for m in [u.module] + ([prod_b[_prefix(u)].module] if _prefix(u) in prod_b else []):
            perturb.setdefault(m, []).append((1, sub, 0.0))
    got = _run_probes(model, ctx.probe_ids.expand(2, -1), perturb, [u.module for u in cons], None)
    want = set(sub.tolist())
    for u in cons:
        if u.in_features != h or not _zeroes_exactly(got[u.module][1], got[u.module][0], want):
            raise _mismatch(f"hidden dimension: {u.name} does not read the residual stream channel by channel")
    ctx.checks.append(f"hidden: {h} dims, {len(prod)} producers, {len(cons)} consumers verified")
    idx = torch.arange(h).unsqueeze(1)
    slices: list[SliceSpec] = []
    seen: set[int] = set()
    for u in prod:
        if u.kind == "embedding":
            slices.append(SliceSpec(f"{u.name}.weight", 1, idx, True, None, "producer"))
            seen.add(params[f"{u.name}.weight"].data_ptr())
        else:
            slices += _row_slices(u, prod_b.get(_prefix(u)), idx, params, True)
    for leaf in sp.leaves:  # RMSNorm weights on the paths
        p = params[leaf]
        if p.dim() == 1 and p.numel() == h:
            slices.append(SliceSpec(leaf, 0, idx, False, None, "consumer"))
    for u in cons:
        if params[f"{u.name}.weight"].data_ptr() in seen:  # tied lm_head shares the embedding
            continue
        slices += _col_slices(u, cons_a.get(_prefix(u)), idx, False)
    return StructureSet(
        "hidden_dim",
        None,
        h,
        slices,
        _base_params_per_group(slices, params),
        torch.zeros(h, dtype=torch.long),
        torch.zeros(h, dtype=torch.bool),
        prunable,
        {"norms": [leaf for leaf in sp.leaves if params[leaf].dim() == 1]},
    )
