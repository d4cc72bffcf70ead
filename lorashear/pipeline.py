"""The LoRAShear pipeline: the only module that composes the stages (ALGORITHM.md section 0).

``run(spec, output_dir)`` loads the model, attaches LoRA, discovers the minimally removable structures, runs the
knowledge-distribution analysis, prunes progressively with LHSPG, slices the zero groups away (checking that the
logits do not change), recovers knowledge in two re-weighted LoRA stages, evaluates and exports. Progress goes to
``on_event``; ``should_cancel`` is polled between steps. Checkpoints in ``work_dir`` let a killed run continue.

Artifacts (ARCHITECTURE.md): ``model/`` (Hugging Face directory that stock ``from_pretrained`` loads), ``adapter/``
and ``pruned_base/`` when the LoRA is also kept separately, ``plan.json`` (replayable pruning plan), ``report.json``
(every metric with its protocol, checksums, versions, seed). ``output_dir`` appears complete or not at all.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import platform
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorashear import checkpoint as ckpt
from lorashear.analysis import analyze
from lorashear.budget import ModelShape, Quotas, plan_quotas
from lorashear.config import DatasetConfig, JobSpec
from lorashear.data import RecordSet, TokenStream, read_records, read_text
from lorashear.errors import (
    Cancelled,
    ConfigError,
    DataError,
    ExactnessError,
    NumericalError,
    UnsupportedModelError,
)
from lorashear.evaluation import perplexity
from lorashear.events import STAGES, CancelHook, Event, EventHook
from lorashear.graph import Structures, discover
from lorashear.modeling import (
    attach_lora,
    count_params,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    write_json,
)
from lorashear.optim import LHSPG
from lorashear.preflight import preflight
from lorashear.prune import check_exact, kept_indices, make_plan, rescale_norms_, slice_, stock_loadable
from lorashear.recovery import SubDataset, batch_loss, mix_weights, round_record
from lorashear.resolve import Roots

log = logging.getLogger(__name__)

SAMPLE_PROMPT = "Once upon a time"


@dataclass
class RunResult:
    """What a finished run returns.

    Attributes:
        summary: headline numbers: ``params_before``, ``params_after``, ``params_target``, ``compression_ratio``
            (fraction of parameters removed, 0-1), ``ppl_dense``, ``ppl_pruned``, ``ppl_recovered``,
            ``max_abs_logit_diff``.
        report: the content of ``report.json``.
        artifacts: ``{"model", "plan", "report", optionally "adapter", "pruned_base"}`` -> paths.
        output_dir: the directory holding them.
    """

    summary: dict[str, Any]
    report: dict[str, Any]
    artifacts: dict[str, Path]
    output_dir: Path


def set_quotas(structures: Structures, q: Quotas) -> dict[str, dict[int, int]]:
    """Map budget quotas onto structure sets: ``{set key: {cluster: groups to remove}}``."""
    out: dict[str, dict[int, int]] = {}
    for s in structures.sets:
        if not s.prunable:
            continue
        if s.kind in ("kv_group", "attention_head") and q.kv_groups:
            out[s.key] = {0: q.kv_groups}
        elif s.kind == "query_head" and q.query_heads_per_group:
            out[s.key] = {int(c): q.query_heads_per_group for c in s.cluster.unique().tolist()}
        elif s.kind == "mlp_channel" and q.channels:
            out[s.key] = {0: q.channels}
        elif s.kind == "hidden_dim" and q.hidden:
            out[s.key] = {0: q.hidden}
    return out


def estimate_peak_bytes(shape: ModelShape, dtype: torch.dtype, lora_params: int, batch: int, seq: int) -> int:
    """Rough peak memory of training with LoRA (ALGORITHM.md section 7: estimate before starting).

    Frozen weights in ``dtype``; LoRA weights, gradients and two AdamW moments in fp32; activations kept for the
    backward pass (per layer about 12 hidden-sized and 4 intermediate-sized tensors per token, plus attention
    scores) and fp32 logits with their gradient.
    """
    elt = torch.finfo(dtype).bits // 8
    weights = shape.total_params * elt
    lora = lora_params * 4 * 4
    tokens = batch * seq
    per_layer = tokens * (12 * shape.hidden_size + 4 * shape.intermediate_size) * elt
    per_layer += batch * shape.num_heads * seq * seq * elt
    logits = tokens * shape.vocab_size * 4 * 3
    return int(weights + lora + shape.num_layers * per_layer + logits)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _peak_memory_mib(device: torch.device) -> dict[str, float]:
    out = {"cpu_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


@dataclass
class _Data:
    calibration: TokenStream
    eval: TokenStream
    train: list[SubDataset]
    instruct: list[SubDataset]
    pool: TokenStream


class _Run:
    def __init__(
        self,
        spec: JobSpec,
        output_dir: Path,
        roots: Roots,
        work_dir: Path,
        on_event: EventHook | None,
        should_cancel: CancelHook | None,
    ) -> None:
        self.spec = spec
        self.output_dir = output_dir
        self.roots = roots
        self.work_dir = work_dir
        self.ckpt_dir = work_dir / "checkpoint"
        self.on_event = on_event
        self.should_cancel = should_cancel
        self.hash = ckpt.spec_hash(spec.to_json())
        self.state: dict[str, Any] = {"spec_hash": self.hash, "stage_done": -1, "results": {}, "timings": {}}
        self.gen = torch.Generator().manual_seed(spec.seed)
        self.last_event = 0.0

    # plumbing -----------------------------------------------------------------------------------------------
    def emit(
        self,
        stage: str,
        kind: str,
        step: int = 0,
        total: int = 0,
        message: str = "",
        metrics: dict[str, float] | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        if self.on_event is not None:
            self.on_event(Event(stage, kind, step, total, message, metrics or {}, data or {}))

    def check_cancel(self, stage: str) -> None:
        if self.should_cancel is not None and self.should_cancel():
            self.save_checkpoint()
            self.emit(stage, "log", message="cancelled; checkpoint written")
            raise Cancelled("cancelled by request")

    def save_checkpoint(self) -> None:
        tensors = {f"model.{n}": p.detach() for n, p in self.model.named_parameters()}
        tensors["rng.data"] = self.gen.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        opt_state = None
        if getattr(self, "optimizer_owner", None) is not None:
            inner = self.optimizer_owner
            t, opt_state = ckpt.flatten_optimizer("opt", inner.state_dict())
            tensors.update(t)
        state = dict(self.state)
        state["optimizer"] = opt_state
        if getattr(self, "lhspg", None) is not None:
            lstate = self.lhspg.state_dict()
            lstate.pop("inner")
            state["lhspg"] = lstate
        ckpt.save(self.ckpt_dir, state, tensors)

    def _restore_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        missing = [n for n in params if f"model.{n}" not in tensors]
        if missing:
            raise ckpt.CheckpointError(f"checkpoint lacks {len(missing)} parameters, e.g. {missing[0]}")
        with torch.no_grad():
            for n, p in params.items():
                t = tensors[f"model.{n}"]
                if p.shape != t.shape:
                    p.data = t.to(p.device, p.dtype).clone()
                else:
                    p.data.copy_(t.to(p.device, p.dtype))
        self.gen.set_state(tensors["rng.data"])
        torch.set_rng_state(tensors["rng.torch"])

    def stage_timer(self, stage: str, t0: float) -> None:
        self.state["timings"][stage] = {"wall_s": time.time() - t0, **_peak_memory_mib(self.device)}

    # setup --------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        spec = self.spec
        t0 = time.time()
        self.emit("load", "stage_start", 0, 3, f"loading {spec.model}")
        if spec.runtime.threads:
            torch.set_num_threads(spec.runtime.threads)
        self.device = resolve_device(spec.runtime.device)
        self.dtype = resolve_dtype(spec.runtime.dtype, self.device)
        checked = preflight(spec, self.roots)  # the same checks the API runs before queueing
        self.model_path = checked.model_path
        self.shape = checked.shape
        torch.manual_seed(spec.seed)
        base = load_model(self.model_path, dtype=self.dtype, device=self.device)
        self.emit("load", "progress", 1, 3, "model loaded")
        n = count_params(base)
        if n != self.shape.total_params:
            raise UnsupportedModelError(
                f"the model holds {n:,} parameters but its config implies {self.shape.total_params:,}; "
                "it has modules this library does not know",
                field="model",
            )
        limit = getattr(base.config, "max_position_embeddings", None)
        if limit:
            for fld, value in (
                ("evaluation.window", spec.evaluation.window),
                ("lhspg.seq_len", spec.lhspg.seq_len),
                ("recovery.seq_len", spec.recovery.seq_len),
                ("analysis.seq_len", spec.analysis.seq_len),
            ):
                if value > limit:
                    raise ConfigError(f"{fld}: {value} tokens exceed the model's context of {limit}", field=fld)
        self.tokenizer = load_tokenizer(self.model_path)
        adapter = self.roots.adapter(spec.adapter) if spec.adapter else None
        self.model = attach_lora(base, spec.lora, adapter=adapter)
        self.emit("load", "progress", 2, 3, "LoRA attached")
        self._check_memory()
        self.data = self._load_data()
        self.emit("load", "stage_end", 3, 3, f"{n:,} parameters, {len(self.data.pool):,} training tokens")
        self.stage_timer("load", t0)

        t0 = time.time()
        self.emit("discover", "stage_start", 0, 1, "tracing the model")
        st = spec.structures
        probe = self.data.calibration.ids[:8].unsqueeze(0)
        self.structures = discover(
            self.model,
            shape=self.shape,
            attention=st.attention,
            mlp=st.mlp,
            hidden=st.hidden,
            probe_ids=probe,
            seed=spec.seed,
        )
        self.quotas = plan_quotas(self.shape, spec.target_ratio, st, spec.analysis.gamma)
        self.set_quotas = set_quotas(self.structures, self.quotas)
        q = self.quotas
        self.emit(
            "discover",
            "stage_end",
            1,
            1,
            f"{len(self.structures.sets)} structure sets; quotas per layer: {q.kv_groups} KV groups, "
            f"{q.query_heads_per_group} query heads per group, {q.channels} channels, {q.hidden} hidden dims",
            data={"quotas": q.to_dict()},
        )
        self.stage_timer("discover", t0)

    def _sub(
        self, ds: DatasetConfig, field: str, stream: bool, seq_len: int, batches: int, batch_size: int
    ) -> SubDataset:
        train_path = self.roots.data(ds.train, f"{field}.train")
        rows = read_records(train_path, f"{field}.train")
        if ds.validation is not None:
            val_rows = read_records(self.roots.data(ds.validation, f"{field}.validation"), f"{field}.validation")
        else:
            k = max(1, int(len(rows) * ds.validation_fraction))
            if len(rows) - k < 1:
                raise DataError(f"{field}: {ds.train} has too few records to hold out a validation split", field=field)
            rows, val_rows = rows[:-k], rows[-k:]
        if stream and all("instruction" not in r for r in rows):
            train: TokenStream | RecordSet = TokenStream.from_text("\n".join(r["text"] for r in rows), self.tokenizer)
            val_stream = TokenStream.from_text("\n".join(r["text"] for r in val_rows), self.tokenizer)
            if len(val_stream) < seq_len:
                raise DataError(f"{field}: validation text holds fewer than {seq_len} tokens", field=field)
            wins = val_stream.windows(seq_len)
            val = [
                {"input_ids": torch.stack(wins[i : i + batch_size]), "labels": torch.stack(wins[i : i + batch_size])}
                for i in range(0, min(len(wins), batches * batch_size), batch_size)
            ]
        else:
            train = RecordSet.from_rows(rows, self.tokenizer, seq_len)
            vset = RecordSet.from_rows(val_rows, self.tokenizer, seq_len)
            n = min(len(vset), batches * batch_size)
            val = [vset.batch(list(range(i, min(i + batch_size, n)))) for i in range(0, n, batch_size)]
        if len(train) == 0:
            raise DataError(f"{field}: {ds.train} yields no training examples", field=field)
        return SubDataset(ds.name, train, val)

    def _check_memory(self) -> None:
        """Estimate peak training memory before starting; refuse on CUDA when it cannot fit."""
        spec = self.spec
        lora = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        batch, seq = max(
            (spec.lhspg.batch_size, spec.lhspg.seq_len),
            (spec.recovery.batch_size, spec.recovery.seq_len),
            key=lambda bs: bs[0] * bs[1],
        )
        need = estimate_peak_bytes(self.shape, self.dtype, lora, batch, seq)
        self.state["memory_estimate_bytes"] = need
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            if need > free:
                raise ConfigError(
                    f"estimated peak memory {need / 2**30:.1f} GiB exceeds the {free / 2**30:.1f} GiB free on "
                    f"{self.device}; lower lhspg/recovery batch_size or seq_len",
                    field="lhspg.batch_size",
                )
        self.emit("load", "log", message=f"estimated peak memory {need / 2**20:,.0f} MiB for training")

    def _load_data(self) -> _Data:
        spec = self.spec
        r = spec.recovery
        calib = TokenStream.from_text(
            read_text(self.roots.data(spec.data.calibration, "data.calibration"), "data.calibration"),
            self.tokenizer,
            max_tokens=spec.analysis.max_tokens,
        )
        if len(calib) < spec.analysis.seq_len:
            raise DataError(
                f"data.calibration: {len(calib)} tokens, fewer than analysis.seq_len={spec.analysis.seq_len}",
                field="data.calibration",
            )
        ev = TokenStream.from_text(read_text(self.roots.data(spec.data.eval, "data.eval"), "data.eval"), self.tokenizer)
        if len(ev) < spec.evaluation.window:
            raise DataError(
                f"data.eval: {len(ev)} tokens, fewer than evaluation.window={spec.evaluation.window}", field="data.eval"
            )
        train = [
            self._sub(d, f"data.train[{i}]", True, r.seq_len, r.eval_batches, r.batch_size)
            for i, d in enumerate(spec.data.train)
        ]
        instruct = [
            self._sub(d, f"data.instruct[{i}]", False, r.seq_len, r.eval_batches, r.batch_size)
            for i, d in enumerate(spec.data.instruct)
        ]
        streams = [d.train for d in train if isinstance(d.train, TokenStream)]
        if not streams:
            raise DataError("data.train: LHSPG needs at least one plain-text dataset", field="data.train")
        pool = TokenStream(torch.cat([s.ids for s in streams]))
        if len(pool) < spec.lhspg.seq_len:
            raise DataError(f"data.train: fewer than lhspg.seq_len={spec.lhspg.seq_len} tokens", field="data.train")
        return _Data(calib, ev, train, instruct, pool)

    # stages -------------------------------------------------------------------------------------------------
    def _ppl(self, stage: str, label: str) -> dict[str, Any]:
        e = self.spec.evaluation
        p = perplexity(
            self.model,
            self.data.eval,
            window=e.window,
            stride=e.stride,
            max_windows=e.max_windows,
            batch_size=e.batch_size,
            dataset=self.spec.data.eval,
        )
        self.emit(
            stage, "log", message=f"perplexity ({label}) {p.perplexity:.3f}", metrics={f"ppl/{label}": p.perplexity}
        )
        return p.to_dict()

    def stage_analyze(self) -> None:
        t0 = time.time()
        a = self.spec.analysis
        self.emit("analyze", "stage_start", 0, 1, "dense perplexity and knowledge distribution")
        res = self.state["results"]
        res["ppl_dense"] = self._ppl("analyze", "dense")
        res["reference_losses"] = {
            d.name: batch_loss(self.model, d.val_batches) for d in self.data.train + self.data.instruct
        }
        windows = self.data.calibration.windows(a.seq_len)

        def progress(done: int, total: int) -> None:
            self.emit("analyze", "progress", done, total, "layer sensitivity")
            self.check_cancel("analyze")  # between probes; a resumed run redoes the analysis

        analysis = analyze(
            self.model,
            self.structures,
            windows,
            gamma=a.gamma,
            ablation_fraction=a.ablation_fraction,
            batch_size=max(1, min(8, len(windows))),
            on_step=progress,
        )
        res["analysis"] = analysis.to_dict()
        worst = sorted(analysis.layer_map, key=lambda r: -r["deviation"])[:3]
        self.emit(
            "analyze",
            "stage_end",
            1,
            1,
            "most sensitive: " + ", ".join(f"{r['node_group']}@{r['layer']} (+{r['deviation']:.3f})" for r in worst),
            data={"layer_map": analysis.layer_map},
        )
        self.stage_timer("analyze", t0)

    def _train_loss(self, batch: dict[str, torch.Tensor], stage: str, step: int) -> float:
        self.model.train()
        batch = {k: v.to(self.device) for k, v in batch.items()}
        out = self.model(**batch, use_cache=False)
        loss = out.loss
        if not torch.isfinite(loss):
            raise NumericalError(
                f"{stage} step {step}: loss is {float(loss)} (dtype {self.dtype}); fp16 overflows: use bfloat16 or "
                "float32, or lower the learning rate"
            )
        loss.backward()
        return float(loss.detach())

    def stage_prune(self) -> None:
        t0 = time.time()
        cfg = self.spec.lhspg
        self.lhspg = LHSPG(self.model, self.structures, self.set_quotas, cfg)
        self.optimizer_owner = self.lhspg.inner
        if "lhspg" in self.state and self.state.get("stage") == "prune":
            self.lhspg.load_state_dict({**self.state["lhspg"], "inner": self._resume_opt})
        total = cfg.total_steps
        if self.lhspg.step_count == 0:
            self.emit("prune", "stage_start", 0, total, f"LHSPG ({cfg.mode}) for {total} steps")
        self.state["stage"] = "prune"
        losses = self.state.setdefault("prune_losses", [])
        while self.lhspg.step_count < total:
            self.check_cancel("prune")
            step = self.lhspg.step_count
            loss = self._train_loss(self.data.pool.sample(cfg.batch_size, cfg.seq_len, self.gen), "prune", step)
            info = self.lhspg.step()
            self.model.zero_grad(set_to_none=True)
            losses.append(loss)
            period, t = self.lhspg.phase(step)
            metrics = {
                "lhspg/loss": loss,
                "lhspg/grad_norm": info["grad_norm"],
                "lhspg/groups_zero": info["groups_zero"],
            }
            self.emit(
                "prune",
                "progress",
                step + 1,
                total,
                f"period {period + 1}/{cfg.periods}" if period >= 0 else "warm-up",
                metrics=metrics,
            )
            if t == cfg.period_steps - 1 and period >= 0:
                self._check_period(period)
            if (step + 1) % self.spec.runtime.checkpoint_every == 0 and step + 1 < total:
                self.save_checkpoint()
        removed = self.lhspg.removed()
        want = {k: sum(v.values()) for k, v in self.set_quotas.items()}
        got = {k: len(removed.get(k, [])) for k in want}
        if got != want:
            raise ExactnessError(f"LHSPG removed {got} groups, quotas were {want}")
        self.state["removed"] = removed
        self.state["results"]["lhspg"] = {
            "history": self.lhspg.history,
            "loss_first": losses[:5],
            "loss_last": losses[-5:],
        }
        self.optimizer_owner = None
        self.lhspg_done = self.lhspg
        self.lhspg = None
        self.emit("prune", "stage_end", total, total, f"{sum(want.values())} groups driven to zero")
        self.stage_timer("prune", t0)

    def _check_period(self, period: int) -> None:
        from lorashear.optim import spread

        for key, q in self.set_quotas.items():
            expect = sum(sum(spread(k, self.spec.lhspg.periods)[: period + 1]) for k in q.values())
            pruned = self.lhspg.pruned[key]
            zero = set(self.lhspg.zero_groups(key))
            if len(pruned) != expect or not pruned <= zero:
                raise ExactnessError(
                    f"after period {period + 1}, {key} has {len(pruned)} groups marked removed "
                    f"(expected {expect}) and {len(pruned - zero)} of them are not exactly zero"
                )

    def _exactness_dtype(self) -> torch.dtype:
        """float64 when a float64 copy of the weights fits comfortably, else the compute dtype."""
        need = 8 * sum(p.numel() for p in self.model.parameters()) * 2
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return torch.float64 if need < free // 2 else self.dtype
        return torch.float64 if need < 8 * 2**30 else self.dtype

    @torch.no_grad()
    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return self.model(input_ids=ids.to(self.device), use_cache=False).logits.double().cpu()

    def _apply_slicing(self) -> dict[str, Any]:
        removed = self.state["removed"]
        kept = kept_indices(self.structures, removed)
        hidden_before = self.shape.hidden_size
        slice_(self.model, kept)
        norms: list[str] = []
        for s in self.structures.sets:
            if s.kind == "hidden_dim" and removed.get(s.key):
                norms = [sl.param for sl in s.slices if sl.role == "consumer" and sl.param in s.meta.get("norms", [])]
                rescale_norms_(self.model, norms, hidden_before, self.model.config.hidden_size)
        return make_plan(kept, self.model.config.to_dict(), norms=norms, hidden_before=hidden_before)

    def stage_compress(self) -> None:
        t0 = time.time()
        self.emit("compress", "stage_start", 0, 3, "slicing zero groups")
        windows = self.data.calibration.windows(min(64, self.spec.analysis.seq_len), limit=4)
        ids = torch.stack(windows)
        # Compare in float64 when the model fits twice over: fp32 summation-order noise through many layers and a
        # large vocabulary reaches 1e-4 on its own (SmolLM2-135M: 2.6e-4), which would hide or fake a real error.
        check_dtype = self._exactness_dtype()
        self.model.to(check_dtype)
        before = self._logits(ids)
        plan = self._apply_slicing()
        self.emit("compress", "progress", 1, 3, "sliced")
        after = self._logits(ids)
        self.model.to(self.dtype)  # exact round trip: every value came from self.dtype
        hidden = bool(self.quotas.hidden)
        if hidden:
            tol = float("inf")  # RMSNorm's epsilon makes hidden-dimension removal close, not exact
        elif check_dtype == torch.float64:
            tol = 1e-4  # RMSNorm and RoPE still compute in float32 inside the float64 model
        else:
            tol = (1e-4 if check_dtype == torch.float32 else 5e-2) * max(1.0, float(before.abs().max()) / 10)
        diff = check_exact(before, after, tol=tol, what="compression")
        n = count_params(self.model)
        if n != self.quotas.params_after:
            raise ExactnessError(f"sliced model has {n:,} parameters, the plan said {self.quotas.params_after:,}")
        res = self.state["results"]
        res["compression"] = {
            "max_abs_logit_diff": diff,
            "compared_in": str(check_dtype).replace("torch.", ""),
            "exact": not hidden,
            "tolerance": tol if not hidden else None,
            "params_after": n,
            "config": plan["config"],
        }
        self.state["plan"] = plan
        self.emit(
            "compress",
            "progress",
            2,
            3,
            f"logits match (max abs diff {diff:.2e})",
            metrics={"compress/max_abs_logit_diff": diff},
        )
        res["ppl_pruned"] = self._ppl("compress", "pruned")
        self.emit("compress", "stage_end", 3, 3, f"{self.quotas.params_before:,} -> {n:,} parameters")
        self.stage_timer("compress", t0)

    def stage_recover(self) -> None:
        t0 = time.time()
        r = self.spec.recovery
        stages = [(1, self.data.train, r.rounds)]
        if self.data.instruct:
            stages.append((2, self.data.instruct, r.rounds if r.instruct_rounds is None else r.instruct_rounds))
        if not r.enabled:
            stages = []
        total = sum(n * r.steps_per_round for _, ds, n in stages)
        rec = self.state.setdefault(
            "recovery",
            {"stage_index": 0, "round": 0, "step": 0, "weights": None, "rounds": [], "losses": [], "stopped_early": {}},
        )
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=r.lr)
        self.optimizer_owner = opt
        if self.state.get("stage") == "recover" and self._resume_opt is not None:
            opt.load_state_dict(self._resume_opt)
        else:
            self.emit("recover", "stage_start", 0, total, f"{len(stages)} recovery stage(s), {total} steps")
        self.state["stage"] = "recover"
        refs_all = self.state["results"]["reference_losses"]
        done_before = sum(n * r.steps_per_round for _, _, n in stages[: rec["stage_index"]])
        while rec["stage_index"] < len(stages):
            stage_no, sets, rounds = stages[rec["stage_index"]]
            names = [d.name for d in sets]
            while rec["round"] < rounds:
                if rec["step"] == 0:
                    losses = [batch_loss(self.model, d.val_batches) for d in sets]
                    refs = [refs_all[n] for n in names]
                    w, dev = mix_weights(
                        losses, refs, rec["weights"], weighting=r.weighting, eta=r.eta, uniform=r.uniform_share
                    )
                    rec["weights"] = w
                    entry = round_record(stage_no, rec["round"], names, losses, refs, w, dev)
                    rec["rounds"].append(entry)
                    self.emit(
                        "recover",
                        "log",
                        done_before + rec["round"] * r.steps_per_round,
                        total,
                        f"stage {stage_no} round {rec['round'] + 1}: weights "
                        + ", ".join(f"{n}={x:.2f}" for n, x in zip(names, w, strict=False)),
                        metrics={f"recovery/weight/{n}": x for n, x in zip(names, w, strict=False)}
                        | {f"recovery/deviation/{n}": d for n, d in zip(names, dev, strict=False)},
                        data=entry,
                    )
                    if max(dev) < r.tau:
                        rec["stopped_early"][str(stage_no)] = rec["round"]
                        break
                while rec["step"] < r.steps_per_round:
                    self.check_cancel("recover")
                    probs = torch.tensor(rec["weights"])
                    i = int(torch.multinomial(probs, 1, generator=self.gen))
                    batch = sets[i].sample(r.batch_size, r.seq_len, self.gen)
                    loss = self._train_loss(batch, "recover", rec["step"])
                    norm = torch.nn.utils.clip_grad_norm_(params, self.spec.lhspg.max_grad_norm)
                    if not torch.isfinite(norm):
                        raise NumericalError(f"recovery: non-finite gradient norm at step {rec['step']}")
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    rec["step"] += 1
                    rec["losses"].append(loss)
                    step = done_before + rec["round"] * r.steps_per_round + rec["step"]
                    self.emit(
                        "recover",
                        "progress",
                        step,
                        total,
                        f"stage {stage_no} round {rec['round'] + 1}",
                        metrics={"recovery/loss": loss, f"recovery/loss/{names[i]}": loss},
                    )
                    if step % self.spec.runtime.checkpoint_every == 0 and step < total:
                        self.save_checkpoint()
                rec["round"] += 1
                rec["step"] = 0
            done_before += rounds * r.steps_per_round
            rec["stage_index"] += 1
            rec["round"] = 0
            rec["step"] = 0
            rec["weights"] = None
        self.optimizer_owner = None
        self.state["results"]["recovery"] = {
            "rounds": rec["rounds"],
            "stopped_early": rec["stopped_early"],
            "loss_first": rec["losses"][:5],
            "loss_last": rec["losses"][-5:],
        }
        self.emit("recover", "stage_end", total, total, "recovery done")
        self.stage_timer("recover", t0)

    def stage_evaluate(self) -> None:
        t0 = time.time()
        self.emit("evaluate", "stage_start", 0, 1, "final perplexity")
        self.state["results"]["ppl_recovered"] = self._ppl("evaluate", "recovered")
        self.state["results"]["sample"] = self._sample(self.model)
        self.emit("evaluate", "stage_end", 1, 1, self.state["results"]["sample"]["text"][:120])
        self.stage_timer("evaluate", t0)

    @torch.no_grad()
    def _sample(self, model: nn.Module) -> dict[str, Any]:
        model.eval()
        ids = self.tokenizer(SAMPLE_PROMPT, return_tensors="pt").input_ids.to(self.device)
        out = model.generate(
            input_ids=ids, max_new_tokens=48, do_sample=False, use_cache=True, pad_token_id=self.tokenizer.pad_token_id
        )
        return {
            "prompt": SAMPLE_PROMPT,
            "text": self.tokenizer.decode(out[0], skip_special_tokens=True),
            "decoding": "greedy, 48 new tokens",
        }

    def stage_export(self) -> RunResult:
        from transformers import AutoModelForCausalLM

        time.time()
        spec = self.spec
        self.emit("export", "stage_start", 0, 3, "writing artifacts")
        staging = self.output_dir.with_name(f".{self.output_dir.name}.staging-{os.getpid()}")
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec.export.dtype]
        artifacts: dict[str, Path] = {}
        probe = torch.stack(self.data.calibration.windows(32, limit=2)).to(self.device)
        self.model.eval()
        with torch.no_grad():
            reference = self.model(input_ids=probe, use_cache=False).logits.float().cpu()
        keep_adapter = spec.export.save_adapter or not spec.export.merge_lora
        if keep_adapter:
            self.model.save_pretrained(str(staging / "adapter"))
            artifacts["adapter"] = self.output_dir / "adapter"
            base_dir = "model" if not spec.export.merge_lora else "pruned_base"
            base = (copy.deepcopy(self.model) if spec.export.merge_lora else self.model).unload()
            base, _ = stock_loadable(base)
            base.to(dtype).save_pretrained(str(staging / base_dir))
            self.tokenizer.save_pretrained(str(staging / base_dir))
            artifacts[base_dir] = self.output_dir / base_dir
        if spec.export.merge_lora:
            merged = self.model.merge_and_unload()
            merged.config.use_cache = True
            merged, self.export_note = stock_loadable(merged)
            merged.to(dtype)
            with torch.no_grad():
                merged_logits = merged.eval()(input_ids=probe, use_cache=False).logits.float().cpu()
            # merging s*B*A into W reorders fp32 sums: noise, but a wrong merge would be O(1)
            self.merge_diff = float((merged_logits - reference).abs().max())
            scale = max(1.0, float(reference.abs().max()) / 10)
            if self.merge_diff > (1e-2 if dtype == torch.float32 else 0.5) * scale:
                raise ExactnessError(f"merging the LoRA changed the logits by {self.merge_diff:.3g}")
            merged.save_pretrained(str(staging / "model"))
            self.tokenizer.save_pretrained(str(staging / "model"))
            artifacts["model"] = self.output_dir / "model"
        self.emit("export", "progress", 1, 3, "weights written")
        # reload with stock from_pretrained: no missing or unexpected keys, same logits
        loaded, info = AutoModelForCausalLM.from_pretrained(
            str(staging / "model"), output_loading_info=True, dtype=torch.float32, trust_remote_code=False
        )
        bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if bad:
            raise ExactnessError(f"exported model does not reload cleanly: {bad}")
        check = loaded.to(self.device)
        if spec.export.merge_lora:
            expected = merged_logits
        else:  # model/ is the pruned base: with its adapter it must compute what the pipeline computed
            from peft import PeftModel

            check = PeftModel.from_pretrained(check, str(staging / "adapter"))
            expected = reference
        with torch.no_grad():
            got = check.eval()(input_ids=probe, use_cache=False).logits.float().cpu()
        reload_diff = float((got - expected).abs().max())
        tol = (1e-4 if dtype == torch.float32 else 0.25) * max(1.0, float(expected.abs().max()) / 10)
        if reload_diff > tol:
            raise ExactnessError(f"reloaded model's logits differ by {reload_diff:.3g} from the pipeline's")
        exported_params = count_params(loaded)
        self.export_arch = type(loaded).__name__
        del loaded
        size = sum(f.stat().st_size for f in (staging / "model").glob("*.safetensors"))
        dense_size = (
            sum(f.stat().st_size for f in self.model_path.glob("*.safetensors"))
            if self.model_path.is_dir()
            else self.model_path.stat().st_size
        )
        self.emit("export", "progress", 2, 3, "reload checked")
        res = self.state["results"]
        summary = {
            "params_before": self.quotas.params_before,
            "params_after": exported_params,
            "params_target": self.quotas.params_target,
            "params_tolerance": self.quotas.tolerance,
            "compression_ratio": 1 - exported_params / self.quotas.params_before,
            "ppl_dense": res["ppl_dense"]["perplexity"],
            "ppl_pruned": res["ppl_pruned"]["perplexity"],
            "ppl_recovered": res["ppl_recovered"]["perplexity"],
            "max_abs_logit_diff": res["compression"]["max_abs_logit_diff"],
        }
        plan = dict(self.state["plan"])
        plan["model"] = spec.model
        write_json(staging / "plan.json", plan)
        artifacts["plan"] = self.output_dir / "plan.json"
        report = self._report(summary, size, dense_size, reload_diff)
        write_json(staging / "report.json", report)
        artifacts["report"] = self.output_dir / "report.json"
        if self.output_dir.exists():
            raise ConfigError(f"output directory {self.output_dir} appeared while the job ran", field="output")
        os.replace(staging, self.output_dir)
        self.emit(
            "export",
            "stage_end",
            3,
            3,
            f"artifacts in {self.output_dir}",
            metrics=dict((f"summary/{k}", float(v)) for k, v in summary.items()),
        )
        return RunResult(summary, report, artifacts, self.output_dir)

    def _report(self, summary: dict[str, Any], size: int, dense_size: int, reload_diff: float | None) -> dict[str, Any]:
        import peft
        import transformers

        import lorashear

        spec = self.spec
        res = self.state["results"]
        files = sorted(self.model_path.glob("*")) if self.model_path.is_dir() else [self.model_path]
        checksums = {
            f.name: _sha256(f)
            for f in files
            if f.is_file() and (f.suffix in (".safetensors", ".json", ".model", ".gguf"))
        }
        e = spec.evaluation
        return {
            "lorashear_version": lorashear.__version__,
            "spec": spec.to_dict(),
            "summary": summary,
            "model": {
                "name": spec.model,
                "shape": self.shape.__dict__,
                "checksums_sha256": checksums,
                "dense_file_bytes": dense_size,
                "pruned_file_bytes": size,
            },
            "environment": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
                "platform": platform.platform(),
                "device": str(self.device),
                "dtype": str(self.dtype),
                "seed": spec.seed,
                "argv": sys.argv[:1],
            },
            "structures": {
                "sets": self.structures.summary(),
                "spaces": self.structures.spaces,
                "checks": self.structures.checks,
            },
            "quotas": self.quotas.to_dict(),
            "analysis": res.get("analysis"),
            "lhspg": res.get("lhspg"),
            "compression": {
                **res.get("compression", {}),
                "reload_max_abs_logit_diff": reload_diff,
                "merge_max_abs_logit_diff": self.merge_diff,
            },
            "export": {"architecture": self.export_arch, "note": self.export_note, "dtype": spec.export.dtype},
            "recovery": res.get("recovery"),
            "perplexity": {
                "protocol": {
                    "dataset": spec.data.eval,
                    "tokenizer": spec.model,
                    "window": e.window,
                    "stride": e.stride or e.window,
                    "max_windows": e.max_windows,
                    "text": "paragraphs joined by newlines; windows score every position after the first",
                },
                "dense": res["ppl_dense"],
                "pruned": res["ppl_pruned"],
                "recovered": res["ppl_recovered"],
            },
            "reference_losses": res.get("reference_losses"),
            "sample": res.get("sample"),
            "timings": self.state["timings"],
            "memory_estimate_bytes": self.state.get("memory_estimate_bytes"),
        }

    # driver -------------------------------------------------------------------------------------------------
    def execute(self) -> RunResult:
        self._resume_opt = None
        self.export_note: str | None = None
        self.merge_diff: float | None = None
        self.export_arch = ""
        self.setup()
        loaded = ckpt.load(self.ckpt_dir, self.hash)
        if loaded is not None:
            state, tensors = loaded
            self.state = state
            for key, groups in state["results"]["analysis"]["protected"].items():
                s = self.structures.by_key()[key]
                s.protected = torch.zeros(s.n_groups, dtype=torch.bool)
                s.protected[groups] = True
            if state["stage_done"] >= STAGES.index("compress"):
                self._apply_slicing()
            self._restore_tensors(tensors)
            if state.get("optimizer") is not None:
                self._resume_opt = ckpt.unflatten_optimizer("opt", tensors, state["optimizer"])
            self.emit(
                "load",
                "log",
                message=f"resumed after stage {STAGES[state['stage_done']]}" if state["stage_done"] >= 0 else "resumed",
            )
        order = [
            ("analyze", self.stage_analyze),
            ("prune", self.stage_prune),
            ("compress", self.stage_compress),
            ("recover", self.stage_recover),
            ("evaluate", self.stage_evaluate),
        ]
        for name, fn in order:
            if self.state["stage_done"] >= STAGES.index(name):
                continue
            fn()
            self.state["stage_done"] = STAGES.index(name)
            self.state.pop("stage", None)
            self._resume_opt = None
            self.check_cancel(name)
            self.save_checkpoint()
        result = self.stage_export()
        shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        return result


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
        ConfigError, DataError, UnsupportedModelError, AdapterMismatchError, TargetNotExpressibleError: bad input
            (``user_error``), naming the field.
        Cancelled: ``should_cancel`` returned True (resumable).
        NumericalError, ExactnessError, CheckpointError: failures of ours, with a diagnostic.
    """
    output_dir = Path(output_dir).resolve()
    if output_dir.exists():
        raise ConfigError(f"output directory {output_dir} already exists", field="output")
    work = Path(work_dir) if work_dir is not None else output_dir.with_name(output_dir.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _Run(spec, output_dir, roots or Roots.from_env(), work, on_event, should_cancel).execute()
    finally:
        with contextlib.suppress(OSError):
            work.rmdir()  # only when empty: a checkpoint to resume from stays


__all__ = ["RunResult", "run", "set_quotas"]
