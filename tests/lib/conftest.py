"""Fixtures for the library tests: tiny LLaMA-family models built from configs, and the bundled model."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from lorashear.resolve import BUNDLED_MODEL_ROOT

STORIES = BUNDLED_MODEL_ROOT / "stories260K"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub: every file is local (peft otherwise probes for a tokenizer)


@dataclass(frozen=True)
class Case:
    """One row of the tiny-config matrix."""

    id: str
    model_type: str
    heads: int
    kv_heads: int
    tie: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "vocab_size": 512,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": 8,
            "max_position_embeddings": 128,
            "tie_word_embeddings": self.tie,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
        if self.model_type == "llama":
            cfg.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        return cfg


CASES = [
    Case("llama-mha", "llama", 4, 4),
    Case("llama-gqa2", "llama", 4, 2),
    Case("llama-gqa4-untied", "llama", 8, 2, tie=False),
    Case("llama-some-lora", "llama", 4, 2, lora_targets=("q_proj", "v_proj", "down_proj")),
    Case("llama-biases", "llama", 4, 2, attention_bias=True, mlp_bias=True),
    Case("mistral-gqa2", "mistral", 4, 2, tie=False),
    Case("qwen2-gqa2-bias", "qwen2", 4, 2),
]


def build_model(case: Case, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny model of the case's family (fp32, eval mode, cache off)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(case.model_type, **case.config())
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # make norms and biases non-trivial so exactness tests mean something
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    model.config.use_cache = False
    return model.eval()


def save_model(case: Case, root: Path, name: str | None = None) -> Path:
    """Save a tiny model with the stories260K tokenizer under ``root/name``."""
    out = root / (name or case.id)
    model = build_model(case)
    model.save_pretrained(str(out))
    for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(STORIES / f, out / f)
    return out


@pytest.fixture(params=CASES, ids=[c.id for c in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


@pytest.fixture(autouse=True)
def _seed_and_dtype() -> None:
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float32)


FAST = {
    "lhspg": {"warmup_steps": 2, "periods": 2, "period_steps": 3, "batch_size": 4, "seq_len": 64},
    "recovery": {"rounds": 1, "steps_per_round": 3, "batch_size": 4, "seq_len": 64, "eval_batches": 2},
    "analysis": {"max_tokens": 1024, "seq_len": 64},
    # zero-shot and speed have their own tests (test_zeroshot, test_speed) and the end-to-end run; measured speed
    # is not deterministic, so the resume tests compare summaries without it
    "evaluation": {"window": 64, "max_windows": 4, "zeroshot": {"enabled": False}, "speed": {"enabled": False}},
    "runtime": {"checkpoint_every": 2},
}
"""Fast pipeline settings (seconds on CPU) for tests that only check plumbing and invariants."""
