"""Quick lever check on the bundled stories260K (minutes on a CPU; issue 9): perplexity after pruning and before
recovery for one-shot group pruning (taylor, magnitude, random; no training) and LHSPG (decay mode, 10 warm-up +
3 x 10 steps of 8 x 128 tokens, LoRA r 8; paper-code saliency vs first-order Taylor importance, and Taylor with
distillation from the dense model at weight 0.5), at 20% and 50%.

Not the quality benchmark of issue 9 (that one is SmolLM2-135M at equal training tokens with zero-shot scores); a
cheap signal for a lever before spending hours on it. Same structures, budget, gamma protection and evaluation for
every row: TinyStories eval text, 128-token windows, 64 windows.

Run alone on the machine (two cores)::

    python bench/levers_stories260k.py --out /tmp/levers.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

import lorashear
from lorashear import JobSpec
from lorashear.baselines import one_shot
from lorashear.evaluation.loss import window_batches
from lorashear.resolve import Roots

BASE = {"model": "stories260K", "analysis": {"max_tokens": 4096}, "evaluation": {"window": 128, "max_windows": 64}}
LHSPG = {"warmup_steps": 10, "periods": 3, "period_steps": 10, "batch_size": 8, "seq_len": 128}


def spec(ratio: float, **over: dict) -> JobSpec:
    d = json.loads(json.dumps(BASE))
    d["target_ratio"] = ratio
    d["evaluation"] |= {"zeroshot": {"enabled": False}, "speed": {"enabled": False}}
    d.update(over)
    return JobSpec.from_dict(d)


def one_shot_row(ratio: float, criterion: str) -> float:
    s = spec(ratio)
    job = lorashear.load(s)
    st = lorashear.discover(job.model, s.structures, probe_ids=job.data.calibration.ids[:8].unsqueeze(0))
    q = lorashear.plan_quotas(job.shape, ratio, s.structures, s.analysis.gamma)
    windows = job.data.calibration.windows(s.analysis.seq_len)
    lorashear.analyze(job.model, st, windows, s.analysis)  # the same protected groups as the pipeline
    removed = one_shot(job.model, st, lorashear.set_quotas(st, q), criterion, window_batches(windows, 8))
    lorashear.compress(job.model, st, removed, probe_ids=job.data.probe(), expected_params=q.params_after)
    return lorashear.evaluate(job.model, job.data.eval, s.evaluation).perplexity.perplexity


def lhspg_row(ratio: float, importance: str, distill: float, tmp: Path) -> float:
    s = spec(ratio, lhspg=LHSPG | {"importance": importance, "distill": distill}, recovery={"enabled": False})
    out = tmp / f"{importance}-{distill}-{ratio}"
    res = lorashear.run(s, out, roots=Roots(), work_dir=tmp / f"{importance}-{distill}-{ratio}.work")
    shutil.rmtree(out)
    return float(res.summary["ppl_pruned"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for ratio in args.ratios:
            for crit in ("taylor", "magnitude", "random"):
                rows.append({"method": f"one-shot {crit}", "ratio": ratio, "ppl": one_shot_row(ratio, crit)})
            for imp, kd in (("lora_saliency", 0.0), ("taylor", 0.0), ("taylor", 0.5)):
                name = f"LHSPG decay, {imp}" + (f", distill {kd}" if kd else "")
                rows.append({"method": name, "ratio": ratio, "ppl": lhspg_row(ratio, imp, kd, Path(d))})
            for r in rows[-6:]:
                print(f"{r['ratio']:.0%}  {r['method']:<36} ppl before recovery {r['ppl']:10.2f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
