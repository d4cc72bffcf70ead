"""The evaluation stage verb: :func:`evaluate` scores a model with an :class:`~lorashear.config.EvaluationConfig`
and returns an :class:`EvaluationResult` (ALGORITHM.md section 6). The dense reference and the final model are scored
with the same settings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from lorashear.config import EvaluationConfig
from lorashear.data import TokenStream
from lorashear.evaluation.ppl import Perplexity, perplexity
from lorashear.evaluation.zeroshot import ZeroShotResult

SAMPLE_PROMPT = "Once upon a time"


@dataclass
class EvaluationResult:
    """What :func:`evaluate` measured.

    Attributes:
        perplexity: perplexity on the evaluation text, with its protocol.
        sample: ``{"prompt", "text", "decoding"}`` of a greedy generation (empty when not asked for).
        zeroshot: zero-shot accuracy through lm-eval (``None`` when disabled or not asked for).
    """

    perplexity: Perplexity
    sample: dict[str, Any] = field(default_factory=dict)
    zeroshot: ZeroShotResult | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "perplexity": self.perplexity.to_dict(),
            "sample": dict(self.sample),
            "zeroshot": self.zeroshot.to_dict() if self.zeroshot is not None else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationResult:
        """Inverse of :meth:`to_dict`."""
        zs = data.get("zeroshot")
        return cls(
            Perplexity.from_dict(data["perplexity"]),
            dict(data.get("sample") or {}),
            ZeroShotResult.from_dict(zs) if zs else None,
        )


@torch.no_grad()
def sample_text(model: nn.Module, tokenizer: Any, prompt: str = SAMPLE_PROMPT, new_tokens: int = 48) -> dict[str, Any]:
    """Greedy continuation of ``prompt`` (``new_tokens`` tokens, KV cache on): ``{"prompt", "text", "decoding"}``."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    out = cast(Any, model).generate(
        input_ids=ids, max_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id
    )
    model.train(was)
    return {
        "prompt": prompt,
        "text": tokenizer.decode(out[0], skip_special_tokens=True),
        "decoding": f"greedy, {new_tokens} new tokens",
    }


def evaluate(
    model: nn.Module,
    stream: TokenStream,
    cfg: EvaluationConfig | None = None,
    *,
    dataset: str = "",
    tokenizer: Any = None,
    sample: bool = False,
    data_root: str | Path | None = None,
    on_task: Callable[[int, int, Any], None] | None = None,
) -> EvaluationResult:
    """Score ``model`` on held-out text with the protocol of ``cfg``, and zero-shot when ``data_root`` is given.

    Args:
        model: a causal LM (PEFT-wrapped or plain); its mode is restored.
        stream: the tokenized evaluation text.
        cfg: perplexity window, stride, window count, batch size, and the zero-shot tasks (defaults:
            :class:`EvaluationConfig`).
        dataset: name of the text, recorded in the protocol.
        tokenizer: needed for ``sample`` and zero-shot.
        sample: also generate a greedy sample.
        data_root: where zero-shot task files resolve; ``None`` (or ``evaluation.zeroshot.enabled: false``) skips
            zero-shot.
        on_task: ``(tasks done, tasks in all, task score)`` after each zero-shot task (a cancel point).

    Returns:
        :class:`EvaluationResult`.

    Raises:
        ValueError: the text is shorter than one window.
    """
    cfg = cfg or EvaluationConfig()
    ppl = perplexity(
        model,
        stream,
        window=cfg.window,
        stride=cfg.stride,
        max_windows=cfg.max_windows,
        batch_size=cfg.batch_size,
        dataset=dataset,
    )
    zs = None
    if data_root is not None and cfg.zeroshot.enabled:
        from lorashear.evaluation.zeroshot import run_zeroshot

        zs = run_zeroshot(model, tokenizer, cfg.zeroshot, data_root=data_root, on_step=on_task)
    return EvaluationResult(ppl, sample_text(model, tokenizer) if sample else {}, zs)


__all__ = ["EvaluationResult", "evaluate", "sample_text"]
