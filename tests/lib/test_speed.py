"""Measured speed: runs and returns sane numbers (no timing asserts), FLOP and parameter counts, the comparison
with the ideal speedup, the tables."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import pytest
import torch

from lorashear.config import SpeedConfig
from lorashear.errors import ConfigError
from lorashear.evaluation.speed import (
    compare_speed,
    count_params,
    forward_flops_per_token,
    measure_speed,
    speed_metrics,
    speed_section,
)
from lorashear.evaluation.tables import speed_table, zeroshot_table

from .conftest import CASES, STORIES, build_model

FAST = SpeedConfig(prompt_len=12, new_tokens=3, batch_sizes=[1, 3], repeats=2, warmup=1)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _narrow(model: torch.nn.Module) -> torch.nn.Module:
    """The same family with half the MLP width and half the query heads: a stand-in for a pruned model."""
    from transformers import AutoModelForCausalLM

    cfg = model.config.__class__.from_dict(model.config.to_dict())
    cfg.intermediate_size //= 2
    cfg.num_attention_heads //= 2
    cfg.num_key_value_heads = max(1, cfg.num_key_value_heads // 2)
    cfg.head_dim = model.config.head_dim
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_measure_speed_on_the_bundled_model() -> None:
    from lorashear.modeling import load_model

    model = load_model(STORIES)
    model.train()
    res = measure_speed(model, cfg=FAST)
    assert model.training  # restored
    assert [r.batch for r in res.rows] == [1, 3]
    for r in res.rows:
        for v in (r.prefill_tokens_per_s, r.decode_tokens_per_s, r.prefill_s, r.decode_s):
            assert math.isfinite(v) and v > 0
        assert r.prefill_tokens_per_s == pytest.approx(r.batch * FAST.prompt_len / r.prefill_s)
        assert r.decode_tokens_per_s == pytest.approx(r.batch * FAST.new_tokens / r.decode_s)
    assert res.params == 260_032
    assert 0 < res.flops_prefill < res.flops_decode  # the decode attends to a longer context
    p = res.to_dict()["protocol"]
    assert p["prompt_len"] == 12 and p["new_tokens"] == 3 and p["repeats"] == 2 and p["statistic"] == "median"
    assert p["dtype"] == "float32" and p["device"] == "cpu" and p["threads"] == 1
    assert len(p["load_average_1m"]) == 2
    json.dumps(res.to_dict())
    assert res.row(3).batch == 3
    with pytest.raises(KeyError):
        res.row(7)


def test_flops_and_params_count_the_modules_and_skip_lora() -> None:
    from lorashear.config import LoRAConfig
    from lorashear.modeling import attach_lora

    model = build_model(CASES[1])  # llama GQA: hidden 32, 4 heads x 8, 2 KV heads, MLP 48, 2 layers, vocab 512
    c = model.config
    q, kv, h, m = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.hidden_size, 48
    linear = c.num_hidden_layers * (h * q + 2 * h * kv + q * h + 3 * h * m) + h * c.vocab_size  # + LM head
    assert forward_flops_per_token(model, 10) == 2 * linear + c.num_hidden_layers * 4 * q * 10
    plain = count_params(model)
    wrapped = attach_lora(model, LoRAConfig(rank=4))
    assert forward_flops_per_token(wrapped, 10) == 2 * linear + c.num_hidden_layers * 4 * q * 10
    assert count_params(wrapped) == plain


def test_compare_speed_against_the_ideal() -> None:
    dense = build_model(CASES[1])
    final = _narrow(dense)
    d = measure_speed(dense, cfg=FAST)
    f = measure_speed(final, cfg=FAST)
    table = compare_speed(d, f)
    assert table["ideal"]["params"] == pytest.approx(d.params / f.params) and table["ideal"]["params"] > 1
    assert table["ideal"]["flops_prefill"] > 1 and table["ideal"]["flops_decode"] > 1
    assert 0 < table["param_ratio"] < 1
    assert [r["batch"] for r in table["rows"]] == [1, 3]
    for row in table["rows"]:
        for phase in ("prefill", "decode"):
            c = row[phase]
            assert c["speedup"] == pytest.approx(c["final_tokens_per_s"] / c["dense_tokens_per_s"])
            assert c["of_ideal"] == pytest.approx(c["speedup"] / c["ideal_speedup"])
            assert c["gain_reached"] == pytest.approx((c["speedup"] - 1) / (c["ideal_speedup"] - 1))
    section = speed_section(d, f)
    assert section["comparison"] == table and section["protocol"]["prompt_len"] == 12
    json.dumps(section)
    assert set(speed_metrics(f, "speed/final")) == {
        f"speed/final/b{b}/{k}_tokens_per_s" for b in (1, 3) for k in ("prefill", "decode")
    }
    text = speed_table({"dense": d.to_dict(), "final": f.to_dict()}, table)
    assert "prefill" in text and "decode" in text and "ideal speedup from counts" in text
    other = measure_speed(final, cfg=SpeedConfig(prompt_len=8, new_tokens=3, batch_sizes=[1], repeats=1))
    with pytest.raises(ValueError):
        compare_speed(d, other)


def test_lengths_beyond_the_context_are_refused_naming_the_field() -> None:
    model = build_model(CASES[0])  # context 128
    with pytest.raises(ConfigError) as exc:
        measure_speed(model, cfg=SpeedConfig(prompt_len=120, new_tokens=16))
    assert exc.value.field == "evaluation.speed.prompt_len"


def test_zeroshot_table_from_dicts() -> None:
    row = {"task": "piqa", "label": "PIQA", "acc": 0.5, "acc_norm": 0.55, "n": 20, "headline": "acc", "score": 0.5}
    res = {
        "tasks": {"piqa": row},
        "avg": 0.5,
        "avg_acc": 0.5,
        "avg5": None,
        "protocol": {"lm_eval_version": "0.4.13", "limit": 20, "tasks": {"piqa": {"file": "z/p", "sha256": "ab" * 32}}},
    }
    worse = dict(res, tasks={"piqa": dict(row, acc=0.25, acc_norm=None)}, avg=0.25, avg_acc=0.25)
    text = zeroshot_table({"dense": res, "final": worse})
    assert "PIQA" in text and "0.5000" in text and "0.2500" in text and "lm-eval 0.4.13" in text and "z/p" in text
    assert not any(line.startswith("avg5") for line in text.splitlines())  # not all five tasks were scored
    paired = {"tasks": {"piqa": {"change": -0.25, "se": 0.1, "n": 20}}, "avg": -0.25, "avg_se": 0.1, "avg5": None}
    line = zeroshot_table({"dense": res, "final": worse}, paired).splitlines()[-3]
    assert line.startswith("change dense -> final") and "avg -25.0 ± 10.0" in line and "PIQA -25.0 ± 10.0" in line
