"""Training-free reconstruction of the sliced layers' output projections (issue 9).

Slicing leaves every kept weight as LHSPG left it, so each layer's attention and MLP now write into the residual
stream from fewer heads and channels than the dense model did. :func:`reconstruct` refits, layer by layer and in
forward order, the kept input columns of each output projection (``o_proj`` of an attention block, ``down_proj``
of an MLP; whatever module consumes a structure set's groups) so that, on calibration text, the pruned block
writes what the dense block wrote:

    W' = argmin_W || X_pruned W^T - Y_dense ||^2 + lambda || W - W_now ||^2,
    lambda = ridge * mean(diag(X^T X))

where ``X_pruned`` ``(tokens, kept inputs)`` is what the module receives in the pruned model (its earlier layers
already refitted) and ``Y_dense`` ``(tokens, hidden)`` what the same module returns in the dense model (target
``block``), or that plus the gap ``R_dense - R_pruned`` between the two residual streams the module adds to
(target ``stream``: each module also cancels the drift earlier layers left, as far as its inputs can). The ridge
term pulls towards the current weights, so a module with too few calibration tokens barely moves. This is the
least-squares compensation of one-shot structured pruners (FLAP's bias compensation, the column refit of
SlimGPT / ZipLM), applied here once after LHSPG's progressive pruning and before the LoRA recovery. Only base
weights change: with a LoRA on the module the new base weight is ``W' - scaling * B A``, so the adapter keeps what
it learned and the merged weight is ``W'``. Calibration forward passes are not training tokens (no gradient).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lorashear.config import RECONSTRUCT_TARGETS, RecoveryConfig
from lorashear.data import TokenStream
from lorashear.graph import Structures
from lorashear.modeling import base_name

STAGE = "recover"
TARGETS = RECONSTRUCT_TARGETS
"""What each output projection is refitted to (:func:`reconstruct`'s ``target``)."""


@dataclass
class ReconstructionResult:
    """What the refit did, per output projection in forward order.

    Attributes:
        modules: plain-model module names (``model.layers.3.self_attn.o_proj``).
        error_before: relative error ``||X W^T - Y|| / ||Y||`` of each module before its refit (its inputs already
            from the refitted earlier layers), on the calibration tokens.
        error_after: the same after the refit.
        tokens: calibration tokens each module was fitted on.
        ridge: the ridge coefficient (fraction of the mean diagonal of ``X^T X``).
        perplexity: the model's perplexity on the evaluation protocol after the refit (set by the pipeline;
            ``None`` when the verb is called alone).
    """

    modules: list[str] = field(default_factory=list)
    error_before: list[float] = field(default_factory=list)
    error_after: list[float] = field(default_factory=list)
    tokens: int = 0
    ridge: float = 0.0
    perplexity: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReconstructionResult:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)

    def summary(self) -> dict[str, Any]:
        """Mean relative errors before and after, and the worst module after."""
        n = max(len(self.modules), 1)
        worst = max(range(len(self.modules)), key=lambda i: self.error_after[i], default=None)
        return {
            "modules": len(self.modules),
            "tokens": self.tokens,
            "ridge": self.ridge,
            "perplexity": self.perplexity,
            "mean_error_before": sum(self.error_before) / n,
            "mean_error_after": sum(self.error_after) / n,
            "worst_after": None if worst is None else [self.modules[worst], self.error_after[worst]],
        }


def refit_windows(pool: TokenStream, cfg: RecoveryConfig, seed: int) -> torch.Tensor:
    """The refit's calibration text for ``recovery.reconstruct``: ``reconstruct_tokens // seq_len`` random windows
    ``(N, seq_len)`` of the plain-text training data, drawn with their own generator seeded by ``seed`` (the job's
    data order is not disturbed).

    Raises:
        DataError: the training text is shorter than ``cfg.seq_len``.
    """
    n = max(1, cfg.reconstruct_tokens // cfg.seq_len)
    return pool.sample(n, cfg.seq_len, torch.Generator().manual_seed(seed))["input_ids"]


class _Captured(Exception):
    """Raised by a capture hook to end a forward pass early once the wanted tensor is seen."""


def output_projections(model: nn.Module, structures: Structures) -> list[str]:
    """Plain-model names of the modules that consume a structure set's groups (``o_proj``, ``down_proj``), in
    forward order (attention before MLP, layer order), each once. The model-wide hidden dimension has none."""
    names: list[str] = []
    for s in structures.sets:
        if s.layer is None:
            continue
        module = s.meta.get("o") or s.meta.get("down")
        if module is None:
            continue
        plain = base_name(str(module))
        if plain not in names:
            names.append(plain)
    return names


def _find(model: nn.Module, plain: str) -> nn.Module:
    """The module of ``model`` (PEFT-wrapped or not) whose plain name is ``plain``: the LoRA wrapper when there is
    one, so its output includes the adapter."""
    for name, module in model.named_modules():
        if base_name(name) == plain and not name.endswith(".base_layer"):
            return module
    raise KeyError(plain)


def _effective_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, nn.Linear]:
    """``(W_effective, delta, base linear)`` of a linear, with ``delta`` the active LoRA adapters' ``scaling B A``
    (zeros without a LoRA)."""
    base = getattr(module, "base_layer", module)
    assert isinstance(base, nn.Linear), type(base)
    delta = torch.zeros_like(base.weight, dtype=torch.float64)
    get_delta = getattr(module, "get_delta_weight", None)
    if get_delta is not None:
        merged = set(getattr(module, "merged_adapters", []) or [])
        for name in getattr(module, "active_adapters", []):
            if name in getattr(module, "lora_A", {}) and name not in merged:
                delta += get_delta(name).detach().double()
    return base.weight.detach().double() + delta, delta, base


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _called_with(module: nn.Module, run: Callable[[], Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Call ``run()`` until ``module`` is entered; return the ``(args, kwargs)`` it was entered with (the rest of
    the forward pass is skipped)."""
    got: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        got.append((args, kwargs))
        raise _Captured

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    except _Captured:
        pass
    finally:
        handle.remove()
    if not got:
        raise RuntimeError("the module did not run in the forward pass")
    return got[0]


def _layer_inputs(model: nn.Module, layer: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run ``model`` on ``ids`` ``(B, T)`` up to ``layer``; return the hidden states ``(B, T, hidden)`` it receives
    and the keyword arguments it is called with (position embeddings, mask)."""
    device = next(model.parameters()).device
    args, kwargs = _called_with(layer, lambda: model(input_ids=ids.to(device), use_cache=False))
    kwargs = dict(kwargs)
    hidden = args[0] if args else kwargs.pop("hidden_states")
    return hidden.detach(), kwargs


def _run_capturing(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], module: nn.Module) -> torch.Tensor:
    """Run ``layer`` until ``module`` runs; return ``module``'s input as ``(tokens, features)`` float64."""
    x = _called_with(module, lambda: layer(hidden, **kwargs))[0][0]
    return x.detach().reshape(-1, x.shape[-1]).double()


def _dense_layer(
    teacher: nn.Module, layer: nn.Module, mods: list[str], inputs: list[tuple[torch.Tensor, dict[str, Any]]]
) -> tuple[list[tuple[torch.Tensor, dict[str, Any]]], dict[str, list[torch.Tensor]]]:
    """Run the dense ``layer`` on every batch: its outputs (the next layer's inputs) and, per module of ``mods``,
    that module's outputs ``(tokens, hidden)`` float32, one tensor per batch."""
    targets: dict[str, list[torch.Tensor]] = {m: [] for m in mods}

    def keep(out_list: list[torch.Tensor]) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: tuple[Any, ...], out: torch.Tensor) -> None:
            out_list.append(out.detach().reshape(-1, out.shape[-1]).float())

        return hook

    handles = [_find(teacher, m).register_forward_hook(keep(targets[m])) for m in mods]
    try:
        outputs = [(_first(layer(h, **kw)).detach(), kw) for h, kw in inputs]
    finally:
        for h in handles:
            h.remove()
    return outputs, targets


def _refit(
    layer: nn.Module,
    module: nn.Module,
    inputs: list[tuple[torch.Tensor, dict[str, Any]]],
    targets: list[torch.Tensor],
    ridge: float,
    name: str,
) -> tuple[float, float, list[torch.Tensor]]:
    """Refit ``module`` (inside the pruned ``layer``) to ``targets``; return its relative error before and after,
    and its outputs after the refit (one ``(tokens, hidden)`` float32 tensor per batch).

    The normal equations are accumulated in float64 on the module's device: ``G = X^T X`` ``(k, k)``,
    ``C = X^T Y`` ``(k, hidden)`` (``k`` kept inputs, plus one for a bias)."""
    w_eff, delta, base = _effective_weight(module)
    device, k = base.weight.device, w_eff.shape[1]
    bias = base.bias is not None
    gram = torch.zeros(k + bias, k + bias, dtype=torch.float64, device=device)
    cross = torch.zeros(k + bias, w_eff.shape[0], dtype=torch.float64, device=device)
    y_sq = 0.0
    xs: list[torch.Tensor] = []
    for (h, kw), y32 in zip(inputs, targets, strict=True):
        x, y = _run_capturing(layer, h, kw, module), y32.to(device, torch.float64)
        if y.shape[1] != w_eff.shape[0]:
            raise ValueError(f"{name}: dense output width {y.shape[1]} != pruned {w_eff.shape[0]}")
        if bias:
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=device)], dim=1)
        xs.append(x.float())
        gram += x.T @ x
        cross += x.T @ y
        y_sq += float((y * y).sum())
    now = torch.cat([w_eff, base.bias.detach().double()[:, None]], dim=1) if bias else w_eff
    lam = ridge * float(gram.diagonal().mean())
    eye = torch.eye(len(gram), dtype=gram.dtype, device=device)
    new = torch.linalg.solve(gram + lam * eye, cross + lam * now.T).T

    def err(w: torch.Tensor) -> float:  # ||X W^T - Y|| / ||Y|| from the accumulated moments
        sq = float((w @ gram * w).sum()) - 2 * float((w * cross.T).sum()) + y_sq
        return max(sq, 0.0) ** 0.5 / max(y_sq, 1e-30) ** 0.5

    dtype = base.weight.dtype
    base.weight.copy_((new[:, :k] - delta).to(dtype))
    if bias:
        base.bias.copy_(new[:, k].to(dtype))
    w32 = new.float()
    return err(now), err(new), [x @ w32.T for x in xs]


def _layers(model: nn.Module, teacher: nn.Module, names: list[str]) -> list[tuple[nn.Module, nn.Module, list[str]]]:
    """``(pruned layer, dense layer, output projections in it)`` per decoder layer, in order."""
    out: dict[str, list[str]] = {}
    for plain in names:
        out.setdefault(plain.rsplit(".", 2)[0], []).append(plain)  # model.layers.3.self_attn.o_proj -> model.layers.3
    return [(_find(model, prefix), _find(teacher, prefix), mods) for prefix, mods in out.items()]


@torch.no_grad()
def reconstruct(
    model: nn.Module,
    teacher: nn.Module,
    structures: Structures,
    windows: torch.Tensor,
    *,
    ridge: float = 1.0,
    target: str = "block",
    batch_size: int = 8,
    on_module: Callable[[int, int, str], None] | None = None,
) -> ReconstructionResult:
    """Refit the kept input columns of every output projection to the dense model's outputs (module docstring).

    Layer by layer: the hidden states entering each decoder layer are kept for both models (one forward pass of
    each layer per batch, plus one pass of the pruned layer per refitted module), so the cost is a few forward
    passes of the whole model over ``windows``, not one per module.

    Args:
        model: the sliced (PEFT) model; base weights of its ``o_proj`` / ``down_proj`` change in place, nothing else.
        teacher: the frozen dense model (plain, unpruned; same family), e.g. :attr:`LoadedJob.teacher`.
        structures: discovery result (names the output projections).
        windows: ``(N, T)`` calibration token ids.
        ridge: the ridge coefficient, a fraction (> 0) of the mean diagonal of ``X^T X``.
        target: ``block``: each module's target is the dense module's output; ``stream``: the dense module's output
            plus the gap between the dense and the pruned residual stream where the module adds to it, so each
            module also cancels what earlier layers left (:data:`TARGETS`).
        batch_size: windows per forward pass.
        on_module: called ``(done, total, module name)`` after each module (progress, cancellation).

    Returns:
        :class:`ReconstructionResult`.

    Raises:
        ValueError: the teacher's module output does not have the pruned module's output width (the hidden
            dimension was pruned, which this refit does not handle), ``windows`` is empty, or ``target`` is unknown.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown reconstruction target {target!r}; known: {', '.join(TARGETS)}")
    if windows.numel() == 0:
        raise ValueError("no calibration windows to reconstruct from")
    was_training = model.training
    model.eval()
    teacher.eval()
    names = output_projections(model, structures)
    layers = _layers(model, teacher, names)
    result = ReconstructionResult(tokens=int(windows.numel()), ridge=ridge)
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    try:
        first_s, first_t = layers[0][0], layers[0][1]
        student_in = [_layer_inputs(model, first_s, ids) for ids in batches]
        dense_in = [_layer_inputs(teacher, first_t, ids) for ids in batches]
        done = 0
        for s_layer, t_layer, mods in layers:
            drift = [
                (t - s).reshape(-1, t.shape[-1]).float() for (t, _), (s, _) in zip(dense_in, student_in, strict=True)
            ]
            dense_in, targets = _dense_layer(teacher, t_layer, mods, dense_in)
            for m in mods:
                goal = targets[m] if target == "block" else [y + d for y, d in zip(targets[m], drift, strict=True)]
                before, after, outs = _refit(s_layer, _find(model, m), student_in, goal, ridge, m)
                # the residual stream's gap after this module: dense stream + dense output - (pruned + pruned output)
                drift = [d + y - o for d, y, o in zip(drift, targets[m], outs, strict=True)]
                result.modules.append(m)
                result.error_before.append(before)
                result.error_after.append(after)
                done += 1
                if on_module is not None:
                    on_module(done, len(names), m)
            student_in = [(_first(s_layer(h, **kw)).detach(), kw) for h, kw in student_in]
    finally:
        model.train(was_training)
    return result


__all__ = ["ReconstructionResult", "output_projections", "reconstruct", "refit_windows"]
