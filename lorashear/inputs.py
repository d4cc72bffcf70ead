"""The load stage: resolve and check the spec's inputs, load the model with its LoRA, tokenize the data.

:func:`load` returns a :class:`LoadedJob` holding everything the later stages read: the PEFT model, the tokenizer,
the sizes, the data (:class:`JobData`), where the weights came from, and the peak-memory estimate of training
(ALGORITHM.md section 7: estimate before starting; refused on CUDA when it cannot fit).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from lorashear.budget import ModelShape, estimate_peak_bytes
from lorashear.config import DatasetConfig, JobSpec
from lorashear.data import (
    PromptTemplate,
    RecordSet,
    SubDataset,
    TokenStream,
    prompt_template,
    read_corpus,
    read_records,
    read_text,
)
from lorashear.errors import ConfigError, DataError, UnsupportedModelError
from lorashear.events import Hooks
from lorashear.modeling import (
    attach_lora,
    count_params,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    stored_weights,
)
from lorashear.preflight import preflight
from lorashear.resolve import Roots

STAGE = "load"


@dataclass
class JobData:
    """Tokenized data of a job.

    Attributes:
        calibration: analysis text (at most ``analysis.max_tokens`` tokens).
        eval: held-out evaluation text.
        train: pretraining-style sub-datasets (recovery stage 1).
        instruct: instruction sub-datasets (recovery stage 2).
        pool: the union of the plain-text training streams (LHSPG samples from it).
    """

    calibration: TokenStream
    eval: TokenStream
    train: list[SubDataset]
    instruct: list[SubDataset]
    pool: TokenStream

    @property
    def subsets(self) -> list[SubDataset]:
        """Every recovery sub-dataset, pretraining-style then instruction."""
        return self.train + self.instruct

    def lhspg_sampler(
        self, batch_size: int, seq_len: int, instruct_share: float, gen: torch.Generator
    ) -> Callable[[], dict[str, torch.Tensor]]:
        """The LHSPG batch source: windows of :attr:`pool`, or with probability ``instruct_share`` (fraction 0-1) a
        batch of records from one of the instruction sub-datasets (``lhspg.instruct_share``, issue 9).

        Args:
            batch_size: sequences per batch.
            seq_len: tokens per pool window (records keep the length they were cut to at load).
            instruct_share: probability that a batch comes from the instruction data; 0 draws nothing extra from
                ``gen``, so the pool's batches are the same as without the option.
            gen: the job's generator (checkpointed, so a resumed run draws the same batches).

        Returns:
            A callable giving ``input_ids`` and ``labels`` (and ``attention_mask`` for records), each ``(B, T)``.
        """

        def from_pool() -> dict[str, torch.Tensor]:
            return self.pool.sample(batch_size, seq_len, gen)

        if instruct_share <= 0 or not self.instruct:
            return from_pool

        def mixed() -> dict[str, torch.Tensor]:
            if float(torch.rand((), generator=gen)) >= instruct_share:
                return from_pool()
            sub = self.instruct[int(torch.randint(len(self.instruct), (), generator=gen))]
            return sub.sample(batch_size, seq_len, gen)

        return mixed

    def calibration_sampler(
        self, batch_size: int, seq_len: int, device: torch.device | None = None
    ) -> Callable[[int], dict[str, torch.Tensor]]:
        """Batches of calibration windows by step, in order and cycling: step ``s`` gives windows
        ``s * batch_size ... s * batch_size + batch_size - 1`` (mod the window count), so a resumed run scores the
        same windows without a random draw (``lhspg.importance_data: calibration``).

        Returns:
            A callable ``step -> {input_ids, labels}``, each ``(batch_size, seq_len)``.
        """
        windows = self.calibration.windows(seq_len)

        def at(step: int) -> dict[str, torch.Tensor]:
            x = torch.stack([windows[(step * batch_size + i) % len(windows)] for i in range(batch_size)])
            x = x.to(device) if device is not None else x
            return {"input_ids": x, "labels": x}

        return at

    def probe(self, seq_len: int = 32, windows: int = 2) -> torch.Tensor:
        """``(windows, seq_len)`` calibration tokens for checks (exactness, sanity, reload)."""
        return torch.stack(self.calibration.windows(seq_len, limit=windows))


@dataclass
class LoadedJob:
    """What the load stage produced (never checkpointed: a resumed run loads again)."""

    model: nn.Module
    tokenizer: Any
    data: JobData
    shape: ModelShape
    model_path: Path
    device: torch.device
    dtype: torch.dtype
    input_dtype: torch.dtype | None
    input_bytes: int
    memory_estimate_bytes: int
    teacher: nn.Module | None = None
    """A frozen copy of the dense model, kept when a stage distills from it (``lhspg.distill``,
    ``recovery.distill``)."""


def _sub(
    roots: Roots,
    tokenizer: Any,
    ds: DatasetConfig,
    field: str,
    stream: bool,
    seq_len: int,
    batches: int,
    bs: int,
    template: PromptTemplate,
) -> SubDataset:
    rows = read_records(roots.data(ds.train, f"{field}.train"), f"{field}.train")
    if ds.validation is not None:
        val_rows = read_records(roots.data(ds.validation, f"{field}.validation"), f"{field}.validation")
    else:
        k = max(1, int(len(rows) * ds.validation_fraction))
        if len(rows) - k < 1:
            raise DataError(f"{field}: {ds.train} has too few records to hold out a validation split", field=field)
        rows, val_rows = rows[:-k], rows[-k:]
    if stream and all("instruction" not in r for r in rows):
        train: TokenStream | RecordSet = TokenStream.from_text("\n".join(r["text"] for r in rows), tokenizer)
        val_stream = TokenStream.from_text("\n".join(r["text"] for r in val_rows), tokenizer)
        if len(val_stream) < seq_len:
            raise DataError(f"{field}: validation text holds fewer than {seq_len} tokens", field=field)
        wins = val_stream.windows(seq_len)[: batches * bs]
        val = [
            {"input_ids": torch.stack(wins[i : i + bs]), "labels": torch.stack(wins[i : i + bs])}
            for i in range(0, len(wins), bs)
        ]
    else:
        train = RecordSet.from_rows(rows, tokenizer, seq_len, template)
        vset = RecordSet.from_rows(val_rows, tokenizer, seq_len, template)
        n = min(len(vset), batches * bs)
        val = [vset.batch(list(range(i, min(i + bs, n)))) for i in range(0, n, bs)]
    if len(train) == 0:
        raise DataError(f"{field}: {ds.train} yields no training examples", field=field)
    return SubDataset(ds.name, train, val)


def load_job_data(spec: JobSpec, roots: Roots, tokenizer: Any) -> JobData:
    """Read and tokenize every data file of ``spec``.

    Raises:
        DataError: a file is missing, malformed or too short for the lengths the spec asks for (``field`` names it).
    """
    r, template = spec.recovery, prompt_template(spec.data.prompt_template)
    calib = TokenStream.from_text(
        read_corpus(roots.data(spec.data.calibration, "data.calibration"), "data.calibration", template),
        tokenizer,
        max_tokens=spec.analysis.max_tokens,
    )
    if len(calib) < spec.analysis.seq_len:
        raise DataError(
            f"data.calibration: {len(calib)} tokens, fewer than analysis.seq_len={spec.analysis.seq_len}",
            field="data.calibration",
        )
    ev = TokenStream.from_text(read_text(roots.data(spec.data.eval, "data.eval"), "data.eval"), tokenizer)
    if len(ev) < spec.evaluation.window:
        raise DataError(
            f"data.eval: {len(ev)} tokens, fewer than evaluation.window={spec.evaluation.window}", field="data.eval"
        )
    args = (r.seq_len, r.eval_batches, r.batch_size, template)
    train = [_sub(roots, tokenizer, d, f"data.train[{i}]", True, *args) for i, d in enumerate(spec.data.train)]
    instruct = [
        _sub(roots, tokenizer, d, f"data.instruct[{i}]", False, *args) for i, d in enumerate(spec.data.instruct)
    ]
    streams = [d.train for d in train if isinstance(d.train, TokenStream)]
    if not streams:
        raise DataError("data.train: LHSPG needs at least one plain-text dataset", field="data.train")
    pool = TokenStream(torch.cat([s.ids for s in streams]))
    if len(pool) < spec.lhspg.seq_len:
        raise DataError(f"data.train: fewer than lhspg.seq_len={spec.lhspg.seq_len} tokens", field="data.train")
    return JobData(calib, ev, train, instruct, pool)


GENERATION_PROMPT_TOKENS = 4
"""Tokens of each ``data.calibration`` window that prompt one generated calibration window."""


def generate_calibration(
    model: nn.Module,
    tokenizer: Any,
    text: TokenStream,
    seq_len: int,
    seed: int,
    *,
    batch_size: int = 16,
    on_batch: Callable[[int, int], None] | None = None,
) -> TokenStream:
    """Calibration windows the model samples itself (``data.calibration_source: generated``, issue 9).

    Each window of ``seq_len`` tokens of ``text`` gives its first :data:`GENERATION_PROMPT_TOKENS` tokens as the
    prompt of one window of the same length, completed by sampling (top-k 50, top-p 0.95, temperature 1, no early
    end of sequence). The global random state is restored afterwards, so the option changes nothing else a seeded
    run draws (LoRA init, batches).

    Args:
        model: the dense model (PEFT-wrapped or not); put in eval mode and left there.
        tokenizer: its tokenizer (for the pad id).
        text: the calibration text as read (at most ``analysis.max_tokens`` tokens).
        seq_len: window length in tokens (``analysis.seq_len``).
        seed: the job's seed.
        batch_size: windows generated at once.
        on_batch: ``(windows done, windows)`` after each batch (progress).

    Returns:
        A stream of ``len(text) // seq_len`` windows, ``(n_windows * seq_len,)`` tokens.

    Raises:
        DataError: ``text`` is shorter than one window.
    """
    prompts = [w[:GENERATION_PROMPT_TOKENS] for w in text.windows(seq_len)]
    if not prompts:
        raise DataError(
            f"data.calibration: {len(text)} tokens, fewer than analysis.seq_len={seq_len}", field="data.calibration"
        )
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    new = seq_len - GENERATION_PROMPT_TOKENS
    out: list[torch.Tensor] = []
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        for i in range(0, len(prompts), batch_size):
            ids = torch.stack(prompts[i : i + batch_size]).to(device)  # (B, prompt)
            gen = cast(Any, model).generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                top_p=0.95,
                top_k=50,
                temperature=1.0,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=pad,
            )
            out.extend(gen[:, :seq_len].cpu())
            if on_batch is not None:
                on_batch(len(out), len(prompts))
    return TokenStream(torch.cat(out))


def _check_memory(
    spec: JobSpec, model: nn.Module, shape: ModelShape, device: torch.device, dtype: torch.dtype, teacher: bool
) -> int:
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batch, seq = max(
        (spec.lhspg.batch_size, spec.lhspg.seq_len),
        (spec.recovery.batch_size, spec.recovery.seq_len),
        key=lambda bs: bs[0] * bs[1],
    )
    elt = torch.finfo(dtype).bits // 8
    need = estimate_peak_bytes(shape, elt, lora, batch, seq) + (shape.total_params * elt if teacher else 0)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        if need > free:
            raise ConfigError(
                f"estimated peak memory {need / 2**30:.1f} GiB exceeds the {free / 2**30:.1f} GiB free on "
                f"{device}; lower lhspg/recovery batch_size or seq_len",
                field="lhspg.batch_size",
            )
    return need


def load(
    spec: JobSpec,
    roots: Roots | None = None,
    *,
    hooks: Hooks | None = None,
) -> LoadedJob:
    """Check the spec against the roots, load the model, attach LoRA, read the data.

    Args:
        spec: the job spec.
        roots: where model and data names resolve (default: environment or bundled assets).
        hooks: progress events (optional).

    Returns:
        :class:`LoadedJob`.

    Raises:
        ConfigError, DataError, UnsupportedModelError, AdapterMismatchError, TargetNotExpressibleError: bad input,
            naming the field.
    """
    hooks = hooks or Hooks()
    roots = roots or Roots.from_env()
    hooks.emit(STAGE, "stage_start", 0, 3, f"loading {spec.model}")
    if spec.runtime.threads:
        torch.set_num_threads(spec.runtime.threads)
    device = resolve_device(spec.runtime.device)
    dtype = resolve_dtype(spec.runtime.dtype, device)
    checked = preflight(spec, roots)  # the same checks the API runs before queueing
    shape = checked.shape
    torch.manual_seed(spec.seed)
    base = load_model(checked.model_path, dtype=dtype, device=device)
    hooks.emit(STAGE, "progress", 1, 3, "model loaded")
    n = count_params(base)
    if n != shape.total_params:
        raise UnsupportedModelError(
            f"the model holds {n:,} parameters but its config implies {shape.total_params:,}; "
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
    tokenizer = load_tokenizer(checked.model_path)
    dense_copy = spec.lhspg.distill or spec.recovery.distill or spec.recovery.reconstruct
    teacher = copy.deepcopy(base).requires_grad_(False).eval() if dense_copy else None
    model = attach_lora(base, spec.lora, adapter=roots.adapter(spec.adapter) if spec.adapter else None)
    hooks.emit(STAGE, "progress", 2, 3, "LoRA attached")
    need = _check_memory(spec, model, shape, device, dtype, teacher is not None)
    hooks.emit(STAGE, "log", message=f"estimated peak memory {need / 2**20:,.0f} MiB for training")
    data = load_job_data(spec, roots, tokenizer)
    if spec.data.calibration_source == "generated":
        windows = len(data.calibration) // spec.analysis.seq_len

        def progress(done: int, total: int) -> None:
            hooks.emit(STAGE, "log", message=f"generated {done}/{total} calibration windows")

        hooks.emit(STAGE, "log", message=f"sampling {windows} calibration windows of {spec.analysis.seq_len} tokens")
        data.calibration = generate_calibration(
            model, tokenizer, data.calibration, spec.analysis.seq_len, spec.seed, on_batch=progress
        )
    hooks.emit(STAGE, "stage_end", 3, 3, f"{n:,} parameters, {len(data.pool):,} training tokens")
    input_dtype, input_bytes = stored_weights(checked.model_path)
    path = checked.model_path
    return LoadedJob(model, tokenizer, data, shape, path, device, dtype, input_dtype, input_bytes, need, teacher)
