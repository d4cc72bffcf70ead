"""Measured generation speed, next to the ideal speedup that parameter and FLOP counts promise.

Protocol: for each batch size, ``batch x prompt_len`` token ids drawn once from a seeded generator (uniform over the
vocabulary, the same ids for every model measured with the same settings); one *prefill* forward over the prompt
with the KV cache on (``use_cache=True``, logits of the last position only), then ``new_tokens`` *decode* forwards
of one token each, feeding back the greedy (argmax) token. ``warmup`` untimed repetitions, then ``repeats`` timed
ones (``time.perf_counter``, CUDA synchronised before each reading); the median time of each phase is reported.
This times the model's forward passes with a cache, not ``generate()``'s bookkeeping.

Ideal speedup: the dense model's forward FLOPs per token divided by the final model's, at the phase's mean context
length (FLOPs: 2 per weight of every linear layer including the LM head, plus 4 x query width x context per layer
for the attention scores and the weighted sum; embeddings, norms and activations are ignored). Decoding at small
batch sizes is limited by reading the weights, so the parameter ratio is reported too.
"""

from __future__ import annotations

import inspect
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from lorashear.config import SpeedConfig
from lorashear.errors import ConfigError


@dataclass
class SpeedRow:
    """Speed at one batch size.

    Attributes:
        batch: sequences processed together.
        prefill_tokens_per_s: ``batch * prompt_len`` / median prefill seconds.
        decode_tokens_per_s: ``batch * new_tokens`` / median decode seconds (tokens generated per second, all
            sequences together).
        prefill_s: median seconds of the prefill forward.
        decode_s: median seconds of the ``new_tokens`` decode forwards.
    """

    batch: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prefill_s: float
    decode_s: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "batch": self.batch,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
        }


@dataclass
class SpeedResult:
    """Measured speed of one model and what it was measured with.

    Attributes:
        rows: one :class:`SpeedRow` per configured batch size, in order.
        params: parameters of the model (tied weights once, LoRA excluded).
        flops_prefill: forward FLOPs per token at the prefill's mean context ``(prompt_len + 1) / 2``.
        flops_decode: forward FLOPs per token at the decode's mean context ``prompt_len + (new_tokens + 1) / 2``.
        protocol: prompt_len, new_tokens, batch sizes, warmup, repeats, statistic (median), timer, input ids (seeded
            uniform), cache, dtype, device, torch threads, CPU count, the 1-minute load average before and after
            (other work on the machine makes timings incomparable), torch version.
    """

    rows: list[SpeedRow]
    params: int
    flops_prefill: float
    flops_decode: float
    protocol: dict[str, Any] = field(default_factory=dict)

    def row(self, batch: int) -> SpeedRow:
        """The row of a batch size.

        Raises:
            KeyError: that batch size was not measured.
        """
        for r in self.rows:
            if r.batch == batch:
                return r
        raise KeyError(f"batch size {batch} was not measured")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``{"rows": [...], "params", "flops_prefill", "flops_decode", "protocol"}``."""
        return {
            "rows": [r.to_dict() for r in self.rows],
            "params": self.params,
            "flops_prefill": self.flops_prefill,
            "flops_decode": self.flops_decode,
            "protocol": dict(self.protocol),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpeedResult:
        """Inverse of :meth:`to_dict` (checkpoints)."""
        rows = [SpeedRow(**r) for r in data["rows"]]
        return cls(rows, data["params"], data["flops_prefill"], data["flops_decode"], dict(data.get("protocol") or {}))


def _is_lora(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def forward_flops_per_token(model: nn.Module, context: float) -> float:
    """Forward FLOPs of one token that attends to ``context`` tokens (see the module docstring).

    Works on any per-layer widths (it reads the modules, not the config); LoRA branches are not counted.
    """
    flops = 0.0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not _is_lora(name):
            flops += 2.0 * m.in_features * m.out_features
        q = getattr(m, "q_proj", None)
        if q is not None and hasattr(m, "o_proj"):  # an attention block: scores and weighted sum
            width = getattr(q, "out_features", None)
            if width is None:  # a wrapper without the attribute
                width = q.weight.shape[0]
            flops += 4.0 * float(width) * float(context)
    return flops


def count_params(model: nn.Module) -> int:
    """Parameters of the model, tied weights once, LoRA excluded."""
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if _is_lora(name) or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def _context_limit(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    value = getattr(cfg, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None


def _load_average() -> float | None:
    """The 1-minute load average of the machine (``None`` where the OS has none): timings taken while other
    processes compete for the cores are not comparable, and CPU threads then wait on each other."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # pragma: no cover - Windows
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_kwarg(model: nn.Module) -> str:
    """Name of the forward argument that takes the KV cache (transformers 5.x renamed ``past_key_values``)."""
    m: Any = model
    base = m.get_base_model() if hasattr(m, "get_base_model") else m
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _out_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.inference_mode()
def _one_run(model: nn.Module, ids: torch.Tensor, new_tokens: int, cache_kw: str) -> tuple[float, float]:
    device = ids.device
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    t1 = time.perf_counter()
    cache = _out_cache(out)
    for _ in range(new_tokens):
        out = model(input_ids=nxt, use_cache=True, **{cache_kw: cache})
        cache = _out_cache(out)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def measure_speed(model: nn.Module, *, cfg: SpeedConfig, vocab_size: int | None = None, seed: int = 0) -> SpeedResult:
    """Prefill and decode tokens/s of ``model`` on its own device and dtype (protocol: module docstring).

    Args:
        model: a causal LM (``PreTrainedModel`` or a PEFT model around one); it is put in eval mode and its
            training mode restored afterwards.
        cfg: lengths, batch sizes, warm-up and repeats.
        vocab_size: input ids are drawn from ``[0, vocab_size)``; defaults to ``model.config.vocab_size``.
        seed: seed of the input ids (same seed and settings -> same ids for the dense and the final model).

    Returns:
        One row per batch size plus the FLOP and parameter counts the ideal speedup is computed from.

    Raises:
        ConfigError: ``prompt_len + new_tokens`` exceeds the model's context (``field``
            ``evaluation.speed.prompt_len``).
    """
    return _measure([model], cfg=cfg, vocab_size=vocab_size, seed=seed)[0]


def measure_speed_pair(
    dense: nn.Module, final: nn.Module, *, cfg: SpeedConfig, vocab_size: int | None = None, seed: int = 0
) -> tuple[SpeedResult, SpeedResult]:
    """Measure two models interleaved: every repeat times the dense model, then the final one, on the same inputs,
    so load from other work on the machine falls on both alike (measured apart, a shared CPU swung single
    measurements by 100x; issue 6). Arguments and errors as :func:`measure_speed`.

    Returns:
        ``(dense result, final result)``.
    """
    a, b = _measure([dense, final], cfg=cfg, vocab_size=vocab_size, seed=seed)
    return a, b


def _measure(
    models: list[nn.Module], *, cfg: SpeedConfig, vocab_size: int | None = None, seed: int = 0
) -> list[SpeedResult]:
    load_before = _load_average()
    for model in models:
        limit = _context_limit(model)
        if limit is not None and cfg.prompt_len + cfg.new_tokens > limit:
            raise ConfigError(
                f"evaluation.speed.prompt_len: prompt_len {cfg.prompt_len} + new_tokens {cfg.new_tokens} exceeds "
                f"the model's context of {limit} tokens",
                field="evaluation.speed.prompt_len",
            )
    vocab = vocab_size or int(cast(Any, models[0]).config.vocab_size)
    param = next(models[0].parameters())
    device = param.device
    gen = torch.Generator().manual_seed(seed)
    cache_kws = [_cache_kwarg(m) for m in models]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    rows: list[list[SpeedRow]] = [[] for _ in models]
    try:
        for b in cfg.batch_sizes:
            ids = torch.randint(0, vocab, (b, cfg.prompt_len), generator=gen).to(device)
            for m, kw in zip(models, cache_kws, strict=True):
                for _ in range(cfg.warmup):
                    _one_run(m, ids, cfg.new_tokens, kw)
            runs: list[list[tuple[float, float]]] = [[] for _ in models]
            for _ in range(cfg.repeats):  # interleaved: each repeat times every model once, in turn
                for i, (m, kw) in enumerate(zip(models, cache_kws, strict=True)):
                    runs[i].append(_one_run(m, ids, cfg.new_tokens, kw))
            for i in range(len(models)):
                pre = statistics.median(r[0] for r in runs[i])
                dec = statistics.median(r[1] for r in runs[i])
                rows[i].append(
                    SpeedRow(
                        batch=b,
                        prefill_tokens_per_s=b * cfg.prompt_len / max(pre, 1e-9),
                        decode_tokens_per_s=b * cfg.new_tokens / max(dec, 1e-9),
                        prefill_s=pre,
                        decode_s=dec,
                    )
                )
    finally:
        for m, was in zip(models, was_training, strict=True):
            m.train(was)
    protocol = {
        "prompt_len": cfg.prompt_len,
        "new_tokens": cfg.new_tokens,
        "batch_sizes": list(cfg.batch_sizes),
        "warmup": cfg.warmup,
        "repeats": cfg.repeats,
        "statistic": "median",
        "interleaved": len(models) > 1,
        "timer": "time.perf_counter" + (" + cuda.synchronize" if device.type == "cuda" else ""),
        "inputs": f"uniform random token ids in [0, {vocab}), seed {seed}",
        "decoding": "greedy, KV cache (use_cache=True), prefill logits of the last position only",
        "dtype": str(param.dtype).replace("torch.", ""),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": [load_before, _load_average()],
        "torch_version": torch.__version__,
    }
    return [
        SpeedResult(
            rows=r,
            params=count_params(m),
            flops_prefill=forward_flops_per_token(m, (cfg.prompt_len + 1) / 2),
            flops_decode=forward_flops_per_token(m, cfg.prompt_len + (cfg.new_tokens + 1) / 2),
            protocol=dict(protocol),
        )
        for m, r in zip(models, rows, strict=True)
    ]


def ideal_speedup(dense: SpeedResult, final: SpeedResult) -> dict[str, float]:
    """Speedups the counts promise: ``{"params", "flops_prefill", "flops_decode"}``, each dense / final (x)."""
    return {
        "params": dense.params / max(final.params, 1),
        "flops_prefill": dense.flops_prefill / max(final.flops_prefill, 1.0),
        "flops_decode": dense.flops_decode / max(final.flops_decode, 1.0),
    }


def compare_speed(dense: SpeedResult, final: SpeedResult) -> dict[str, Any]:
    """The speed table: measured speedup of the final model over the dense one next to the ideal.

    Returns:
        ``{"ideal": ideal_speedup(...), "param_ratio": final/dense params (fraction 0-1), "rows": [...]}`` with one
        row per batch size measured for both: ``{"batch", "prefill": {...}, "decode": {...}}``, each phase holding
        ``dense_tokens_per_s``, ``final_tokens_per_s``, ``speedup`` (final / dense tokens/s, x), ``ideal_speedup``
        (the phase's FLOP ratio, x), ``of_ideal`` (speedup / ideal_speedup; 1.0 = all of the ideal reached) and
        ``gain_reached`` ((speedup - 1) / (ideal_speedup - 1): the fraction of the ideal gain realised; ``None``
        when the ideal is no gain).

    Raises:
        ValueError: the two results were measured with different lengths.
    """
    for key in ("prompt_len", "new_tokens"):
        if dense.protocol.get(key) != final.protocol.get(key):
            raise ValueError(f"dense and final speed were measured with different {key}")
    ideal = ideal_speedup(dense, final)
    rows = []
    for d in dense.rows:
        try:
            f = final.row(d.batch)
        except KeyError:
            continue
        row: dict[str, Any] = {"batch": d.batch}
        for phase, ideal_x in (("prefill", ideal["flops_prefill"]), ("decode", ideal["flops_decode"])):
            dt = getattr(d, f"{phase}_tokens_per_s")
            ft = getattr(f, f"{phase}_tokens_per_s")
            speedup = ft / dt if dt > 0 else float("nan")
            row[phase] = {
                "dense_tokens_per_s": dt,
                "final_tokens_per_s": ft,
                "speedup": speedup,
                "ideal_speedup": ideal_x,
                "of_ideal": speedup / ideal_x,
                "gain_reached": (speedup - 1.0) / (ideal_x - 1.0) if abs(ideal_x - 1.0) > 1e-9 else None,
            }
        rows.append(row)
    return {"ideal": ideal, "param_ratio": final.params / max(dense.params, 1), "rows": rows}


def speed_section(dense: SpeedResult, final: SpeedResult) -> dict[str, Any]:
    """The ``speed`` section of a report: ``{"dense", "final", "comparison": compare_speed(dense, final),
    "protocol"}``.

    Raises:
        ValueError: the two results were measured with different lengths.
    """
    return {
        "dense": dense.to_dict(),
        "final": final.to_dict(),
        "comparison": compare_speed(dense, final),
        "protocol": dict(final.protocol),
    }


def speed_metrics(result: SpeedResult, prefix: str) -> dict[str, float]:
    """Flat metrics for events and metric series, e.g. ``{"speed/final/b1/decode_tokens_per_s": 812.0, ...}``."""
    out: dict[str, float] = {}
    for r in result.rows:
        out[f"{prefix}/b{r.batch}/prefill_tokens_per_s"] = r.prefill_tokens_per_s
        out[f"{prefix}/b{r.batch}/decode_tokens_per_s"] = r.decode_tokens_per_s
    return out
