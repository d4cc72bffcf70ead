"""The LoRAShear pipeline: a thin composer of the public stage verbs (ALGORITHM.md section 0; issue 10).

``run(spec, output_dir)`` calls, in order: :func:`~lorashear.inputs.load` (model, LoRA, data),
:func:`~lorashear.graph.discover` with :func:`~lorashear.budget.plan_quotas`, :func:`~lorashear.analysis.analyze`
(after the dense :func:`~lorashear.evaluation.evaluate`), :func:`~lorashear.optim.prune` (LHSPG),
:func:`~lorashear.compression.compress`, :func:`~lorashear.recovery.recover`, :func:`~lorashear.evaluation.evaluate`
and :func:`~lorashear.compression.export`, then writes ``plan.json`` and ``report.json`` (:mod:`lorashear.report`).
Each stage can also be called alone from Python (README, "Library").

What the composer adds: progress events (``on_event``), cancellation (``should_cancel``, polled between steps and
probes), a sanity check of the logits after every training stage (issue 7), and resumable checkpoints in
``work_dir``: the typed :class:`~lorashear.runstate.RunState` after every stage, plus the running loop's state when
a loop is interrupted, so a killed or cancelled run resumes at any stage boundary or inside a training loop and
finishes with the same weights. ``output_dir`` appears complete or not at all.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from lorashear import runstate
from lorashear.analysis import analyze
from lorashear.budget import plan_layer_quotas, plan_quotas
from lorashear.checkpoint import spec_hash
from lorashear.compression import ExportResult, compress, export, load_exported
from lorashear.config import JobSpec
from lorashear.errors import ConfigError
from lorashear.evaluation import evaluate, mean_loss, measure_speed_pair, speed_metrics, zeroshot_metrics
from lorashear.events import STAGES, CancelHook, EventHook, Hooks, LoopState
from lorashear.graph import discover
from lorashear.inputs import load
from lorashear.modeling import load_model
from lorashear.optim import prune, set_quotas
from lorashear.recovery import reconstruct, recover, recovery_stages
from lorashear.recovery.reconstruct import refit_windows
from lorashear.report import RunResult, build_report, draw_report, peak_memory_mib, publish, staging_dir, summary
from lorashear.resolve import Roots
from lorashear.training import check_sane


class _Composer:
    def __init__(self, spec: JobSpec, output_dir: Path, roots: Roots, work_dir: Path, hooks: Hooks) -> None:
        self.spec, self.output_dir, self.roots = spec, output_dir, roots
        self.ckpt_dir = work_dir / "checkpoint"
        self.hooks = hooks
        hooks.save = self._save
        hooks.checkpoint_every = spec.runtime.checkpoint_every
        self.state = runstate.RunState(spec_hash(spec.to_json()))
        self.gen = torch.Generator().manual_seed(spec.seed)

    def _save(self, loop: LoopState | None) -> None:
        runstate.save(self.ckpt_dir, self.state, self.job.model, self.gen, loop)

    def _timed(self, stage: str, t0: float) -> None:
        self.state.timings[stage] = {"wall_s": time.time() - t0, **peak_memory_mib(self.job.device)}

    def _evaluate(self, stage: str, label: str, *, sample: bool = False, zeroshot: bool = False) -> Any:
        def on_task(done: int, total: int, score: Any) -> None:
            message = f"zero-shot ({label}) {score.label} {score.score:.3f} [{done}/{total}]"
            self.hooks.emit(stage, "log", message=message)
            self.hooks.cancel_point(stage)

        job, e = self.job, self.spec.evaluation
        root = self.roots.data_root if zeroshot else None
        res = evaluate(
            job.model, job.data.eval, e, dataset=self.spec.data.eval, tokenizer=job.tokenizer, sample=sample,
            data_root=root, on_task=on_task,
        )  # fmt: skip
        metrics = {f"ppl/{label}": res.perplexity.perplexity}
        metrics |= zeroshot_metrics(res.zeroshot, f"zeroshot/{label}") if res.zeroshot else {}
        self.hooks.emit(stage, "log", message=f"perplexity ({label}) {res.perplexity.perplexity:.3f}", metrics=metrics)
        return res

    # stages ---------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        t0 = time.time()
        self.job = load(self.spec, self.roots, hooks=self.hooks)
        self._timed("load", t0)
        t0, st = time.time(), self.spec.structures
        self.hooks.emit("discover", "stage_start", 0, 1, "tracing the model")
        probe = self.job.data.calibration.ids[:8].unsqueeze(0)
        self.structures = discover(self.job.model, st, shape=self.job.shape, probe_ids=probe, seed=self.spec.seed)
        self.quotas = plan_quotas(self.job.shape, self.spec.target_ratio, st, self.spec.analysis.gamma)
        self.set_quotas = set_quotas(self.structures, self.quotas)
        message = f"{len(self.structures.sets)} structure sets; {self.quotas.describe()}"
        self.hooks.emit("discover", "stage_end", 1, 1, message, data={"quotas": self.quotas.to_dict()})
        self._timed("discover", t0)
        self.state.stage_done = STAGES.index("discover")

    def stage_analyze(self, _loop: LoopState | None) -> None:
        a, data = self.spec.analysis, self.job.data
        self.hooks.emit("analyze", "stage_start", 0, 1, "dense perplexity and knowledge distribution")
        self.state.dense = self._evaluate("analyze", "dense", zeroshot=True)
        self.state.reference_losses = {d.name: mean_loss(self.job.model, d.val_batches) for d in data.subsets}
        windows = data.calibration.windows(a.seq_len)

        def progress(done: int, total: int) -> None:
            self.hooks.emit("analyze", "progress", done, total, "layer sensitivity")
            self.hooks.cancel_point("analyze")  # a resumed run redoes the analysis from its start

        args = (self.job.model, self.structures, windows, a)
        result = self.state.analysis = analyze(*args, batch_size=max(1, min(8, len(windows))), on_step=progress)
        message = f"most sensitive: {result.most_sensitive()}"
        self.hooks.emit("analyze", "stage_end", 1, 1, message, data={"layer_map": result.layer_map})
        if self._plan_layers():
            self.hooks.emit("analyze", "log", message=self.quotas.describe(), data={"quotas": self.quotas.to_dict()})

    def _plan_layers(self) -> bool:
        """Per-layer layout: quotas from the analysed layer map (once the analysis exists; also after a resume)."""
        st = self.spec.structures
        if st.layout != "per_layer" or self.state.analysis is None or self.quotas.layers:
            return False
        layer_map = self.state.analysis.layer_map
        self.quotas = plan_layer_quotas(self.job.shape, self.spec.target_ratio, st, self.spec.analysis.gamma, layer_map)
        self.set_quotas = set_quotas(self.structures, self.quotas)
        return True

    def stage_prune(self, loop: LoopState | None) -> None:
        cfg = self.spec.lhspg
        sample = self.job.data.lhspg_sampler(cfg.batch_size, cfg.seq_len, cfg.instruct_share, self.gen)
        args = (self.job.model, self.structures, self.set_quotas, cfg, sample)
        scored_on = (
            self.job.data.calibration_sampler(cfg.batch_size, self.spec.analysis.seq_len, self.job.device)
            if cfg.importance_data == "calibration"
            else None
        )
        self.state.prune = prune(
            *args, hooks=self.hooks, resume=loop, teacher=self.job.teacher, importance_sample=scored_on
        )
        check_sane(self.job.model, self.job.data.probe(), stage="prune", step=cfg.total_steps)

    def stage_compress(self, _loop: LoopState | None) -> None:
        assert self.state.prune is not None
        self.hooks.emit("compress", "stage_start", 0, 3, "slicing zero groups")
        probe = self.job.data.probe(min(64, self.spec.analysis.seq_len), 4)
        args = (self.job.model, self.structures, self.state.prune.removed)
        res = self.state.compression = compress(*args, probe_ids=probe, expected_params=self.quotas.params_after)
        diff, metric = res.max_abs_logit_diff, {"compress/max_abs_logit_diff": res.max_abs_logit_diff}
        self.hooks.emit("compress", "progress", 2, 3, f"logits match (max abs diff {diff:.2e})", metrics=metric)
        self.state.pruned = self._evaluate("compress", "pruned")
        message = f"{self.quotas.params_before:,} -> {res.params_after:,} parameters"
        self.hooks.emit("compress", "stage_end", 3, 3, message)

    def stage_recover(self, loop: LoopState | None) -> None:
        r, data = self.spec.recovery, self.job.data
        if r.reconstruct and self.state.reconstruction is None:  # a resumed recovery has it already
            self._reconstruct()
        stages = recovery_stages(data.train, data.instruct, r)
        args = (self.job.model, stages, self.state.reference_losses, r, self.gen)
        clip, teacher = self.spec.lhspg.max_grad_norm, self.job.teacher
        self.state.recovery = recover(*args, max_grad_norm=clip, hooks=self.hooks, resume=loop, teacher=teacher)
        check_sane(self.job.model, data.probe(), stage="recover")

    def _reconstruct(self) -> None:
        """``recovery.reconstruct``: the least-squares refit before the fine-tuning. It has no cancel point of its
        own (a checkpoint of half-refitted weights would not resume to the same model): a cancel asked for during
        the refit takes effect at the fine-tuning's first step, a killed run redoes it from the sliced weights."""
        r, job = self.spec.recovery, self.job
        assert job.teacher is not None  # load keeps the dense copy when recovery.reconstruct is set
        windows = refit_windows(job.data.pool, r, self.spec.seed)

        def progress(done: int, total: int, name: str) -> None:
            self.hooks.emit("recover", "log", message=f"least-squares refit {done}/{total}: {name}")

        res = reconstruct(
            job.model,
            job.teacher,
            self.structures,
            windows,
            ridge=r.reconstruct_ridge,
            target=r.reconstruct_target,
            on_module=progress,
        )
        check_sane(job.model, job.data.probe(), stage="recover")
        res.perplexity = self._evaluate("recover", "reconstructed").perplexity.perplexity
        self.state.reconstruction = res
        s = res.summary()
        message = (
            f"least-squares refit of {s['modules']} output projections on {s['tokens']} tokens: "
            f"mean relative error {s['mean_error_before']:.3f} -> {s['mean_error_after']:.3f}, "
            f"perplexity {res.perplexity:.3f}"
        )
        metrics = {
            "reconstruction/error_before": s["mean_error_before"],
            "reconstruction/error_after": s["mean_error_after"],
        }
        self.hooks.emit("recover", "log", message=message, metrics=metrics, data=s)

    def stage_evaluate(self, _loop: LoopState | None) -> None:
        self.hooks.emit("evaluate", "stage_start", 0, 1, "final perplexity and zero-shot accuracy")
        self.state.final = self._evaluate("evaluate", "recovered", sample=True, zeroshot=True)
        self.hooks.emit("evaluate", "stage_end", 1, 1, self.state.final.sample["text"][:120])

    # driver -------------------------------------------------------------------------------------------------
    def resume(self, resumed: runstate.Resumed | None) -> LoopState | None:
        if resumed is None:
            return None
        resumed.state.timings.update(self.state.timings)  # this attempt's load and discovery
        self.state = resumed.state
        resumed.apply(self.job.model, self.structures, self.gen)
        done = self.state.stage_done
        self.hooks.emit("load", "log", message=f"resumed after stage {STAGES[done]}" if done >= 0 else "resumed")
        return resumed.loop

    def execute(self) -> RunResult:
        resumed = runstate.load(self.ckpt_dir, self.state.spec_hash)
        self.setup()
        loop = self.resume(resumed)
        self._plan_layers()
        stages = (self.stage_analyze, self.stage_prune, self.stage_compress, self.stage_recover, self.stage_evaluate)
        for fn in stages:
            name = fn.__name__.removeprefix("stage_")
            if self.state.done(name):
                continue
            t0 = time.time()
            fn(loop if loop is not None and loop.stage == name else None)
            self.state.stage_done = STAGES.index(name)
            self._timed(name, t0)
            loop = None
            self.hooks.cancel_point(name)
            self._save(None)
        result = self.export()
        shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        return result

    def export(self) -> RunResult:
        t0 = time.time()
        self.hooks.emit("export", "stage_start", 0, 2, "writing artifacts")
        staging = staging_dir(self.output_dir)
        try:
            ex, report, artifacts = self._write_artifacts(staging, t0)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # never leave a half-written export behind
            raise
        head = summary(self.state, self.quotas, ex, report)
        metrics = {f"summary/{k}": float(v) for k, v in head.items()}
        self.hooks.emit(
            "export", "stage_end", 2, 2, f"artifacts written: {', '.join(sorted(artifacts))}", metrics=metrics
        )
        return RunResult(head, report, artifacts, self.output_dir)

    def _write_artifacts(self, staging: Path, t0: float) -> tuple[ExportResult, dict[str, Any], dict[str, Path]]:
        """Write and check every artifact in ``staging``, then publish it as the output directory."""
        job, state = self.job, self.state
        input_bytes = job.input_bytes if job.input_dtype is not None else None  # GGUF: quantised, not comparable
        ex = export(
            job.model, job.tokenizer, self.spec.export, staging, probe_ids=job.data.probe(),
            input_dtype=job.input_dtype, input_bytes=input_bytes,
        )  # fmt: skip
        if "gguf" in self.spec.export.formats:
            from lorashear.compression.gguf_export import write_gguf

            self.hooks.emit("export", "log", message="writing model.gguf")
            ex.gguf_max_abs_logit_diff = write_gguf(
                staging / "model", staging / "model.gguf", source=job.model_path, probe_ids=job.data.probe()
            )
            ex.artifacts["gguf"] = "model.gguf"
            ex.checks.append("gguf_reload")
        self.hooks.emit("export", "progress", 1, 2, "reload checked")
        speed = None
        if self.spec.evaluation.speed.enabled:  # the input and what a user downloads, interleaved, in one dtype
            dense = load_model(job.model_path, dtype=job.dtype, device=job.device)
            final = load_exported(staging, dtype=job.dtype, device=job.device)
            speed = measure_speed_pair(dense, final, cfg=self.spec.evaluation.speed, seed=self.spec.seed)
            metrics = speed_metrics(speed[0], "speed/dense") | speed_metrics(speed[1], "speed/final")
            self.hooks.emit("export", "log", message="speed measured", metrics=metrics)
        assert state.compression is not None
        self._timed("export", t0)
        report = build_report(self.spec, state, job, self.structures, self.quotas, ex, speed)
        plan = {**state.compression.plan, "model": self.spec.model}
        artifacts = {name: self.output_dir / rel for name, rel in ex.artifacts.items()}
        artifacts |= draw_report(report, staging, self.output_dir)
        artifacts |= publish(staging, self.output_dir, {"plan.json": plan, "report.json": report})
        return ex, report, artifacts


def run(
    spec: JobSpec,
    output_dir: str | Path,
    *,
    roots: Roots | None = None,
    work_dir: str | Path | None = None,
    on_event: EventHook | None = None,
    should_cancel: CancelHook | None = None,
) -> RunResult:
    """Run the whole pipeline for one job spec.

    Args:
        spec: the validated job spec.
        output_dir: where the artifacts go; must not exist (written to a staging sibling and renamed).
        roots: model and data roots the spec's names resolve under (default: env or bundled assets).
        work_dir: checkpoints; a checkpoint of the same spec there is resumed (default ``<output_dir>.work``).
        on_event: receives every :class:`~lorashear.events.Event`.
        should_cancel: polled between steps; ``True`` writes a checkpoint and raises ``Cancelled``.

    Returns:
        :class:`RunResult`.

    Raises:
        ConfigError, DataError, UnsupportedModelError, AdapterMismatchError, TargetNotExpressibleError,
            DivergedError: bad input (``user_error``), naming the field.
        Cancelled: ``should_cancel`` returned True (resumable).
        ExactnessError, CheckpointError: failures of ours, with a diagnostic.
    """
    output_dir = Path(output_dir).resolve()
    if output_dir.exists():
        raise ConfigError(f"output directory {output_dir.name} already exists", field="output")
    work = Path(work_dir) if work_dir is not None else output_dir.with_name(output_dir.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    hooks = Hooks(on_event, should_cancel)
    try:
        return _Composer(spec, output_dir, roots or Roots.from_env(), work, hooks).execute()
    finally:
        with contextlib.suppress(OSError):
            work.rmdir()  # only when empty: a checkpoint to resume from stays


__all__ = ["RunResult", "run"]
