"""Perplexity with a stated protocol (ALGORITHM.md section 6)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lorashear.data import TokenStream
from lorashear.evaluation.loss import token_nll


@dataclass
class Perplexity:
    """A perplexity and the protocol that produced it.

    Attributes:
        perplexity: exp(mean negative log-likelihood per scored token).
        nll: mean negative log-likelihood, nats per token.
        window: tokens per window; stride: tokens between window starts; windows: windows evaluated;
        tokens: tokens scored (each window scores all positions after its first, or the last ``stride`` when
        windows overlap).
        dataset: name of the evaluation text.
    """

    perplexity: float
    nll: float
    window: int
    stride: int
    windows: int
    tokens: int
    dataset: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Perplexity:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


def perplexity(
    model: nn.Module,
    stream: TokenStream,
    *,
    window: int = 128,
    stride: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 8,
    dataset: str = "",
) -> Perplexity:
    """Sliding-window perplexity of ``model`` on a token stream.

    Non-overlapping (``stride == window``): every window is scored on all its positions but the first. With
    ``stride < window``, windows after the first score only their last ``stride`` tokens (context carried over),
    the Hugging Face recipe.

    Raises:
        ValueError: the text holds fewer than ``window`` tokens, or a bad window/stride/batch size.
    """
    if window < 2 or (stride is not None and not 1 <= stride <= window) or batch_size < 1:
        raise ValueError(
            f"need window >= 2, 1 <= stride <= window, batch_size >= 1 (got {window}, {stride}, {batch_size})"
        )
    stride = stride or window
    ids = stream.ids
    n = ids.numel()
    if n < window:
        raise ValueError(f"evaluation text holds {n} tokens, fewer than window={window}")
    starts = list(range(0, n - window + 1, stride))
    if max_windows is not None:
        starts = starts[:max_windows]
    was_training = model.training
    model.eval()
    total_nll, total_tok = 0.0, 0
    try:
        for b in range(0, len(starts), batch_size):
            chunk = starts[b : b + batch_size]
            x = torch.stack([ids[s : s + window] for s in chunk])  # (B, window)
            labels = x.clone()
            for j, s in enumerate(chunk):
                if s > 0 and stride < window:
                    labels[j, : window - stride] = -100  # context carried over, scored by the previous window
            nll, k = token_nll(model, {"input_ids": x, "labels": labels})
            total_nll += nll
            total_tok += k
    finally:
        model.train(was_training)
    mean = total_nll / max(total_tok, 1)
    return Perplexity(math.exp(mean), mean, window, stride, len(starts), total_tok, dataset)
