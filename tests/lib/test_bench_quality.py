"""The quality benchmark's seed summary (bench/quality.py, issue 9): the yardstick a lever's row is read against."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def quality():
    sys.path.insert(0, str(BENCH))
    try:
        import quality as mod  # bench/quality.py

        yield mod
    finally:
        sys.path.remove(str(BENCH))


def row(method: str, ratio: float, ppl: float, avg5: float) -> dict:
    return {"method": method, "target_ratio": ratio, "ppl_wikitext2_128": ppl, "avg5": avg5}


def test_seed_summary_groups_seeds_per_method_and_ratio(quality) -> None:
    rows = [
        row("m", 0.5, 100.0, 38.0),
        row("m-seed1", 0.5, 120.0, 39.0),
        row("m-seed2", 0.5, 110.0, 40.0),
        row("m", 0.2, 60.0, 43.0),  # one seed at 20%: no line
        row("other", 0.5, 90.0, 37.0),
        row("orphan-seed1", 0.5, 90.0, 37.0),  # no seed-0 row: no line
    ]
    text = quality.seed_summary(rows)
    lines = [ln for ln in text.splitlines() if ln.startswith("| m ")]
    sd = statistics.stdev([38.0, 39.0, 40.0])
    assert lines == [f"| m | 50% | 3 | 110.00 ± 10.00 (100.00-120.00) | 39.00 ± {sd:.2f} (38.00-40.00) |"]
    assert "orphan" not in text and "| other " not in text
    assert quality.seed_summary([row("m", 0.5, 1.0, 1.0), row("other", 0.5, 1.0, 1.0)]) == ""


def test_dense_lora_control_trains_like_the_one_shot_lora_row(quality) -> None:
    """``dense+lora`` (issue 9's control: what the training pool alone does) spends the same tokens, steps, LoRA and
    data as ``oneshot-taylor+lora`` and is measured once, at target 0, like the dense row."""
    import argparse

    args = argparse.Namespace(smoke=False, device="cpu")
    control, peer = quality.ROWS["dense+lora"], quality.ROWS["oneshot-taylor+lora"]
    assert control.kind == "dense" and control.train and not quality.ROWS["dense"].train
    a, b = quality.one_shot_spec(control, 0.2, args), quality.one_shot_spec(peer, 0.2, args)
    assert {k: v for k, v in a.items() if k != "target_ratio"} == {k: v for k, v in b.items() if k != "target_ratio"}
    tokens = quality.train_tokens(a, "one_shot")
    assert tokens == quality.train_tokens(b, "one_shot") == 102 * quality.BATCH * quality.SEQ


def test_every_training_row_spends_the_budget(quality) -> None:
    """Issue 9's equal-budget rule: every row that trains spends 102 x 4 x 256 = 104,448 tokens, however its steps
    and batches are cut; rows without training spend none; the one extra row named as such spends about twice."""
    import argparse

    args = argparse.Namespace(smoke=False, device="cpu")
    budget = 102 * quality.BATCH * quality.SEQ
    for name, r in quality.ROWS.items():
        if r.kind == "lorashear":
            tokens = quality.train_tokens(quality.row_spec(quality.BASE, r, 0.5, args), "lorashear")
        elif r.train:
            tokens = quality.train_tokens(quality.one_shot_spec(r, 0.5, args), "one_shot")
        else:
            continue
        if name.endswith("-2xrecovery"):
            assert 2 * budget <= tokens <= 2.1 * budget, name
        else:
            assert tokens == budget, (name, tokens)
