"""The evaluation stage verb: :func:`evaluate` scores a model with an :class:`~lorashear.config.EvaluationConfig`
and returns an :class:`EvaluationResult` (ALGORITHM.md section 6). The dense reference and the final model are scored
with the same settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from lorashear.config import EvaluationConfig
from lorashear.data import TokenStream
from lorashear.evaluation.ppl import Perplexity, perplexity

SAMPLE_PROMPT = "Once upon a time"


@dataclass
class EvaluationResult:
    """What :func:`evaluate` measured.

    Attributes:
        perplexity: perplexity on the evaluation text, with its protocol.
        sample: ``{"prompt", "text", "decoding"}`` of a greedy generation (empty when not asked for).
    """

    perplexity: Perplexity
    sample: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"perplexity": self.perplexity.to_dict(), "sample": dict(self.sample)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationResult:
        """Inverse of :meth:`to_dict`."""
        return cls(Perplexity.from_dict(data["perplexity"]), dict(data.get("sample") or {}))


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
) -> EvaluationResult:
    """Score ``model`` on held-out text with the protocol of ``cfg``.

    Args:
        model: a causal LM (PEFT-wrapped or plain); its mode is restored.
        stream: the tokenized evaluation text.
        cfg: window, stride, window count and batch size (defaults: :class:`EvaluationConfig`).
        dataset: name of the text, recorded in the protocol.
        tokenizer: when given, a greedy sample is generated too.

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
    return EvaluationResult(ppl, sample_text(model, tokenizer) if tokenizer is not None else {})


__all__ = ["EvaluationResult", "evaluate", "sample_text"]
