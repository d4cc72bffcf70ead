"""Cheap checks of a job spec before anything is queued (standard library only; GGUF headers need ``gguf``).

Checks that every name resolves under the configured roots, the model's config is readable and its architecture
supported, an existing adapter fits the model, and the pruning target is expressible for this architecture (the
same budget arithmetic the pipeline uses; GQA divisibility included). No weights are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorashear.budget import ModelShape, Quotas, plan_quotas
from lorashear.config import JobSpec
from lorashear.errors import AdapterMismatchError, ConfigError, UnsupportedModelError
from lorashear.resolve import Roots


@dataclass(frozen=True)
class PreflightResult:
    """What the pre-flight learned: the model's sizes and the quotas the target turns into."""

    model_path: Path
    shape: ModelShape
    quotas: Quotas


def read_model_config(path: Path) -> dict[str, Any]:
    """Parsed ``config.json`` of a model directory, or the equivalent of a GGUF file's header.

    Raises:
        UnsupportedModelError: unreadable or malformed config.
    """
    if path.suffix == ".gguf":
        return gguf_config(path)
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UnsupportedModelError(f"cannot read {path.name}/config.json: {exc}", field="model") from None
    if not isinstance(cfg, dict):
        raise UnsupportedModelError("config.json is not a JSON object", field="model")
    return cfg


_GGUF_ARCH = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}


def gguf_config(path: Path) -> dict[str, Any]:
    """Hugging Face style config keys from a GGUF file's metadata (no tensors are read).

    Raises:
        UnsupportedModelError: not a readable GGUF file, or an architecture outside the LLaMA family.
    """
    try:
        from gguf import GGUFReader
    except ImportError:  # pragma: no cover
        raise UnsupportedModelError("reading GGUF files needs the 'gguf' package", field="model") from None
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # malformed file: the reader raises many types
        raise UnsupportedModelError(f"{path.name} is not a readable GGUF file: {exc}", field="model") from None

    def value(key: str) -> Any:
        f = reader.fields.get(key)
        if f is None:
            return None
        v = f.contents()
        return v

    arch = value("general.architecture")
    if arch not in _GGUF_ARCH:
        raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported", field="model")
    tokens = value("tokenizer.ggml.tokens")
    heads = value(f"{arch}.attention.head_count")
    hidden = value(f"{arch}.embedding_length")
    cfg = {
        "model_type": _GGUF_ARCH[arch],
        "num_hidden_layers": value(f"{arch}.block_count"),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": value(f"{arch}.attention.head_count_kv") or heads,
        "intermediate_size": value(f"{arch}.feed_forward_length"),
        "vocab_size": value(f"{arch}.vocab_size") or (len(tokens) if tokens is not None else None),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
    }
    key_len = value(f"{arch}.attention.key_length")
    if key_len:
        cfg["head_dim"] = key_len
    return cfg


def check_adapter(adapter_dir: Path, shape: ModelShape, field: str = "adapter") -> dict[str, Any]:
    """Check an existing PEFT LoRA adapter against the model's sizes without loading weights.

    Raises:
        AdapterMismatchError: not a LoRA adapter, unknown target modules, or tensor shapes that do not fit.
    """
    try:
        acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterMismatchError(f"{field}: cannot read adapter_config.json: {exc}", field=field) from None
    if acfg.get("peft_type", "LORA") != "LORA":
        raise AdapterMismatchError(f"{field}: peft_type {acfg.get('peft_type')!r} is not LORA", field=field)
    expected = expected_lora_shapes(shape)
    header = _safetensors_header(adapter_dir / "adapter_model.safetensors", field)
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        proj = next((p for p in expected if f".{p}.lora_" in key), None)
        if proj is None:
            raise AdapterMismatchError(f"{field}: tensor {key!r} targets a module this model lacks", field=field)
        rows, cols = meta["shape"][:2] if len(meta["shape"]) == 2 else (None, None)
        out_f, in_f = expected[proj]
        if ".lora_A." in key and cols != in_f:
            raise AdapterMismatchError(
                f"{field}: {key} has shape {meta['shape']} but {proj} takes {in_f} inputs", field=field
            )
        if ".lora_B." in key and rows != out_f:
            raise AdapterMismatchError(
                f"{field}: {key} has shape {meta['shape']} but {proj} has {out_f} outputs", field=field
            )
    return acfg


def expected_lora_shapes(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """``{projection: (out_features, in_features)}`` of a decoder layer's linears."""
    h, hd = shape.hidden_size, shape.head_dim
    return {
        "q_proj": (shape.num_heads * hd, h),
        "k_proj": (shape.num_kv_heads * hd, h),
        "v_proj": (shape.num_kv_heads * hd, h),
        "o_proj": (h, shape.num_heads * hd),
        "gate_proj": (shape.intermediate_size, h),
        "up_proj": (shape.intermediate_size, h),
        "down_proj": (h, shape.intermediate_size),
    }


def _safetensors_header(path: Path, field: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or n > 100_000_000:
                raise ValueError("bad header length")
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as exc:
        raise AdapterMismatchError(f"{field}: {path.name} is not a safetensors file: {exc}", field=field) from None
    if not isinstance(header, dict):
        raise AdapterMismatchError(f"{field}: {path.name} has a malformed header", field=field)
    return header


def check_zeroshot(spec: JobSpec, roots: Roots) -> None:
    """Check the zero-shot tasks of a spec: known names, files present under the data root, the first lines of each
    in the task's layout (a few lines read per file).

    Raises:
        ConfigError: an unknown task name (``evaluation.zeroshot.tasks[i]``) or an invalid file name.
        DataError: a missing, empty or malformed task file (``evaluation.zeroshot.task_dir`` or
            ``evaluation.zeroshot.files.<task>``).
    """
    from lorashear.evaluation.tasks import check_tasks

    if spec.evaluation.zeroshot.enabled:
        check_tasks(spec.evaluation.zeroshot, roots.data_root)


def preflight(spec: JobSpec, roots: Roots) -> PreflightResult:
    """Run every cheap check of ``spec`` against the roots.

    Raises:
        ConfigError, DataError: a name that does not resolve, an unknown zero-shot task, a task file missing or in
            the wrong layout (``field`` names it).
        UnsupportedModelError: unreadable config or unsupported architecture.
        AdapterMismatchError: an adapter that does not fit the model.
        TargetNotExpressibleError: a target the budget cannot reach.
    """
    model_path = roots.model(spec.model)
    shape = ModelShape.from_config(read_model_config(model_path))
    smallest = min(shape.hidden_size, shape.num_kv_heads * shape.head_dim)
    if spec.adapter is None and spec.lora.rank > smallest:
        raise ConfigError(
            f"lora.rank: {spec.lora.rank} exceeds the smallest adapted dimension of this model ({smallest})",
            field="lora.rank",
        )
    if spec.adapter is not None:
        check_adapter(roots.adapter(spec.adapter), shape)
    roots.data(spec.data.calibration, "data.calibration")
    roots.data(spec.data.eval, "data.eval")
    for key in ("train", "instruct"):
        for i, ds in enumerate(getattr(spec.data, key)):
            roots.data(ds.train, f"data.{key}[{i}].train")
            if ds.validation is not None:
                roots.data(ds.validation, f"data.{key}[{i}].validation")
    check_zeroshot(spec, roots)
    quotas = plan_quotas(shape, spec.target_ratio, spec.structures, spec.analysis.gamma)
    return PreflightResult(model_path, shape, quotas)
