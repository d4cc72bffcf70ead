"""Cheap checks of a job spec before anything is queued (standard library only; GGUF headers need ``gguf``).

Checks that every name resolves under the configured roots, the model's config is readable and its architecture
supported, the weight files' safetensors headers (one file or a sharded index) are well formed, hold every tensor
``config.json`` implies with that shape and a floating dtype, and are as long as their headers say, the tokenizer's
ids fit the vocabulary, the estimated training memory fits the worker, an existing adapter fits the model, and the
pruning target is expressible for this architecture (the same budget arithmetic the pipeline uses; GQA
divisibility included). Only headers are read, never tensor data; every size in ``config.json`` is checked against
the files' actual tensors before anything is sized from it.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from lorashear._autoregister import FAMILIES as PER_LAYER_FAMILIES
from lorashear.budget import ModelShape, Quotas, estimate_peak_bytes, plan_quotas
from lorashear.config import GGUF_FAMILIES, JobSpec
from lorashear.errors import AdapterMismatchError, ConfigError, ModelFileError, UnsupportedModelError
from lorashear.families import family_for_gguf
from lorashear.resolve import Roots

MAX_HEADER_BYTES = 100_000_000
"""Largest safetensors header read (the safetensors library's own limit)."""

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1,
}  # fmt: skip
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
_LAYER_RE = re.compile(r"^model\.layers\.(\d{1,9})\.")


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
    family = family_for_gguf(arch)
    tokens = value("tokenizer.ggml.tokens")
    heads = value(f"{arch}.attention.head_count")
    hidden = value(f"{arch}.embedding_length")
    cfg = {
        "model_type": family.model_type,
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


def read_safetensors_header(path: Path, *, label: str | None = None) -> dict[str, dict[str, Any]]:
    """The tensor table of a safetensors file, checked without reading tensor data: the header length fits the
    file, the header is a JSON object, every entry has a known dtype, a shape of non-negative integers and data
    offsets whose length matches shape x dtype, the entries tile the data section exactly, and the file is as long
    as the header says (a truncated download is caught here).

    Returns:
        ``{tensor name: {"dtype", "shape", "data_offsets"}}`` (``__metadata__`` removed).

    Raises:
        ModelFileError: naming the file (``label``, default its name) and, where one is at fault, the tensor.
    """
    label = label or path.name
    try:
        st = path.stat()
    except OSError as exc:
        raise ModelFileError(f"cannot read {label}: {exc.strerror}", field="model") from None
    return _cached_header(str(path), st.st_size, st.st_mtime_ns, label)


@lru_cache(maxsize=64)
def _cached_header(path: str, size: int, mtime_ns: int, label: str) -> dict[str, dict[str, Any]]:
    def bad(message: str) -> ModelFileError:
        return ModelFileError(f"{label}: {message}", field="model")

    if size < 8:
        raise bad(f"the file is {size} bytes, too short for a safetensors header")
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 1 or n > MAX_HEADER_BYTES or n > size - 8:
                raise bad(f"header length {n} does not fit a file of {size} bytes (truncated or not safetensors)")
            raw = fh.read(n)
    except OSError as exc:
        raise bad(f"cannot be read: {exc.strerror}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise bad("the header is not valid JSON (not a safetensors file, or a corrupted one)") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    spans = []
    for name, meta in header.items():
        if not isinstance(meta, dict):
            raise bad(f"tensor {name!r} has a malformed entry")
        dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise bad(f"tensor {name!r} has an unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise bad(f"tensor {name!r} has a malformed shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise bad(f"tensor {name!r} has malformed data offsets {offsets!r}")
        if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise bad(
                f"tensor {name!r}: {offsets[1] - offsets[0]} bytes of data for shape {shape} in {dtype} "
                f"({math.prod(shape) * DTYPE_BYTES[dtype]} expected)"
            )
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    end = 0
    for start, stop, name in spans:
        if start != end:
            raise bad(f"tensor {name!r} starts at byte {start} of the data, expected {end} (overlap or gap)")
        end = stop
    if end != data_len:
        if end > data_len:
            raise bad(f"the file is {size} bytes but its header describes {8 + n + end}: it is truncated")
        raise bad(f"{data_len - end} bytes after the last tensor (a corrupted or concatenated file)")
    return header


def weight_files(model_dir: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Headers of a model directory's weights: ``model.safetensors``, or the shards that
    ``model.safetensors.index.json`` names (each tensor must be in the shard the index says).

    Returns:
        ``{file name: tensor table}``.

    Raises:
        ModelFileError: no weights, a malformed index, a shard outside the directory or missing, a bad header.
    """
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not weight_map:
                raise TypeError("weight_map is not a non-empty object")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise ModelFileError(f"model.safetensors.index.json is malformed: {exc}", field="model") from None
        shards: dict[str, set[str]] = {}
        for tensor, shard in weight_map.items():
            if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard in ("", ".", ".."):
                raise ModelFileError(
                    f"model.safetensors.index.json maps {tensor!r} to {str(shard)[:100]!r}, not a file of the model "
                    "directory",
                    field="model",
                )
            shards.setdefault(shard, set()).add(tensor)
        out = {}
        for shard, tensors in sorted(shards.items()):
            if not (model_dir / shard).is_file():
                raise ModelFileError(f"shard {shard} named by model.safetensors.index.json is missing", field="model")
            header = read_safetensors_header(model_dir / shard)
            missing = sorted(tensors - header.keys())
            if missing:
                raise ModelFileError(
                    f"{shard}: lacks tensor {missing[0]!r} that model.safetensors.index.json places there",
                    field="model",
                )
            out[shard] = header
        return out
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise ModelFileError(
            f"{model_dir.name} has no model.safetensors or model.safetensors.index.json (pickle checkpoints are "
            "refused)",
            field="model",
        )
    return {"model.safetensors": read_safetensors_header(single)}


def expected_tensors(shape: ModelShape) -> dict[str, list[int]]:
    """``{name: shape}`` of every tensor a Hugging Face LLaMA-family checkpoint with these sizes must hold."""
    h, hd, v = shape.hidden_size, shape.head_dim, shape.vocab_size
    q, kv, inter = shape.num_heads * hd, shape.num_kv_heads * hd, shape.intermediate_size
    out: dict[str, list[int]] = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h]}
    if not shape.tie_word_embeddings:
        out["lm_head.weight"] = [v, h]
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        out.update(
            {
                p + "input_layernorm.weight": [h],
                p + "post_attention_layernorm.weight": [h],
                p + "self_attn.q_proj.weight": [q, h],
                p + "self_attn.k_proj.weight": [kv, h],
                p + "self_attn.v_proj.weight": [kv, h],
                p + "self_attn.o_proj.weight": [h, q],
                p + "mlp.gate_proj.weight": [inter, h],
                p + "mlp.up_proj.weight": [inter, h],
                p + "mlp.down_proj.weight": [h, inter],
            }
        )
        if shape.qkv_bias:
            out.update(
                {p + "self_attn.q_proj.bias": [q], p + "self_attn.k_proj.bias": [kv], p + "self_attn.v_proj.bias": [kv]}
            )
        if shape.o_bias:
            out[p + "self_attn.o_proj.bias"] = [h]
        if shape.mlp_bias:
            out.update(
                {p + "mlp.gate_proj.bias": [inter], p + "mlp.up_proj.bias": [inter], p + "mlp.down_proj.bias": [h]}
            )
    return out


def check_weights(model_dir: Path, shape: ModelShape) -> None:
    """Check a model directory's weights against its ``config.json`` without reading tensor data.

    The layer count is compared with the layers the files hold before anything is sized from ``config.json``
    (a config claiming 10^9 layers is refused here, not allocated); then every implied tensor must exist with the
    implied shape and a floating dtype.

    Raises:
        ModelFileError: naming the file and the tensor at fault.
    """
    files = weight_files(model_dir)
    where = {name: fname for fname, header in files.items() for name in header}
    layers = {int(m.group(1)) for name in where if (m := _LAYER_RE.match(name))}
    contiguous = bool(layers) and min(layers) == 0 and max(layers) == len(layers) - 1
    if not contiguous or len(layers) != shape.num_layers:
        held = f"layers 0-{max(layers)}" if layers and len(layers) == max(layers) + 1 else f"{len(layers)} layer(s)"
        if layers and len(layers) != max(layers) + 1:
            gap = next(i for i, n in enumerate(sorted(layers)) if i != n)  # first missing index
            held += f" with model.layers.{gap}.* missing"
        raise ModelFileError(
            f"config.json says num_hidden_layers={shape.num_layers} but the weights hold {held}", field="model"
        )
    for name, want in expected_tensors(shape).items():
        fname = where.get(name)
        if fname is None:
            first = next(iter(files))
            raise ModelFileError(
                f"{first if len(files) == 1 else 'the weight shards'}: tensor {name!r} is missing "
                f"(config.json implies shape {want})",
                field="model",
            )
        meta = files[fname][name]
        if meta["shape"] != want:
            hint = ""
            if name in ("model.embed_tokens.weight", "lm_head.weight") and meta["shape"][:1] != want[:1]:
                hint = f" (vocab_size is {shape.vocab_size})"
            raise ModelFileError(
                f"{fname}: tensor {name!r} has shape {meta['shape']} but config.json implies {want}{hint}",
                field="model",
            )
        if meta["dtype"] not in FLOAT_DTYPES:
            raise ModelFileError(f"{fname}: tensor {name!r} has dtype {meta['dtype']}, not a float", field="model")


def check_tokenizer(model_dir: Path, shape: ModelShape, max_bytes: int = 64 << 20) -> None:
    """Every token id of ``tokenizer.json`` (vocabulary and added tokens) must be below ``vocab_size``.

    Raises:
        ModelFileError: malformed tokenizer.json, or ids the embedding has no row for.
    """
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return
    if path.stat().st_size > max_bytes:
        raise ModelFileError(f"tokenizer.json is larger than {max_bytes >> 20} MiB", field="model")
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
        vocab = (tok.get("model") or {}).get("vocab") or {}
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
        ids += [t["id"] for t in tok.get("added_tokens") or []]
        top = max((int(i) for i in ids), default=-1)
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ModelFileError(f"tokenizer.json is malformed: {type(exc).__name__}", field="model") from None
    if top >= shape.vocab_size:
        raise ModelFileError(
            f"tokenizer.json has token id {top} but the model's vocab_size is {shape.vocab_size}", field="model"
        )


def check_gguf(path: Path, shape: ModelShape) -> None:
    """The GGUF file's ``blk.N`` tensors must cover exactly the ``block_count`` layers its metadata claims, and its
    token embedding must have ``vocab_size`` rows.

    Raises:
        ModelFileError: naming the file and the disagreement.
    """
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        tensors = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    except Exception as exc:  # malformed file: the reader raises many types
        raise ModelFileError(f"{path.name} is not a readable GGUF file: {type(exc).__name__}", field="model") from None
    layers = {int(m.group(1)) for name in tensors if (m := re.match(r"^blk\.(\d{1,9})\.", name))}
    if not layers or min(layers) != 0 or max(layers) != len(layers) - 1 or len(layers) != shape.num_layers:
        raise ModelFileError(
            f"{path.name}: metadata says {shape.num_layers} blocks but the file holds {len(layers)}", field="model"
        )
    embd = tensors.get("token_embd.weight")
    if embd is None or sorted(embd) != sorted([shape.hidden_size, shape.vocab_size]):
        raise ModelFileError(
            f"{path.name}: tensor 'token_embd.weight' has shape {embd} but the metadata implies "
            f"[{shape.hidden_size}, {shape.vocab_size}]",
            field="model",
        )


def training_memory_bytes(shape: ModelShape, spec: JobSpec) -> int:
    """Peak training memory of ``spec`` on this model (:func:`lorashear.budget.estimate_peak_bytes`), from the
    config alone: the LoRA size from the target modules' shapes, fp32 unless the spec asks for a 16-bit dtype."""
    elt = 2 if spec.runtime.dtype in ("bfloat16", "float16") else 4
    rank = spec.lora.rank
    lora = sum(rank * (o + i) for p, (o, i) in expected_lora_shapes(shape).items() if p in spec.lora.target_modules)
    batch, seq = max(
        (spec.lhspg.batch_size, spec.lhspg.seq_len),
        (spec.recovery.batch_size, spec.recovery.seq_len),
        key=lambda bs: bs[0] * bs[1],
    )
    return estimate_peak_bytes(shape, elt, lora * shape.num_layers, batch, seq)


def machine_memory_bytes() -> int | None:
    """Physical memory of this machine, or ``None`` when unknown."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        return None


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


def preflight(spec: JobSpec, roots: Roots, *, memory_limit: int | None = None) -> PreflightResult:
    """Run every cheap check of ``spec`` against the roots.

    Args:
        spec: the job spec.
        roots: where names resolve.
        memory_limit: bytes a worker has for one job (default: this machine's physical memory); a job whose
            estimated peak exceeds it is refused.

    Raises:
        ConfigError, DataError: a name that does not resolve (``field`` names it); a job too large for the
            worker's memory; an unknown zero-shot task, or a task file missing or in the wrong layout.
        UnsupportedModelError: unreadable config or unsupported architecture.
        ModelFileError: weights or tokenizer that are broken or disagree with ``config.json``.
        AdapterMismatchError: an adapter that does not fit the model.
        TargetNotExpressibleError: a target the budget cannot reach.
    """
    model_path = roots.model(spec.model)
    shape = ModelShape.from_config(read_model_config(model_path))
    if model_path.suffix == ".gguf":
        check_gguf(model_path, shape)
    else:
        check_weights(model_path, shape)
        check_tokenizer(model_path, shape)
    limit = memory_limit if memory_limit is not None else machine_memory_bytes()
    need = training_memory_bytes(shape, spec)
    if limit and need > limit:
        raise ConfigError(
            f"estimated peak memory {need / 2**30:.1f} GiB exceeds the {limit / 2**30:.1f} GiB a worker has; "
            "lower lhspg/recovery batch_size or seq_len, or use a smaller model",
            field="lhspg.batch_size",
        )
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
    if spec.structures.layout == "per_layer" and shape.model_type not in PER_LAYER_FAMILIES:
        raise UnsupportedModelError(
            f"structures.layout: per_layer needs a per-layer model class, which exists for "
            f"{', '.join(PER_LAYER_FAMILIES)}, not {shape.model_type!r}; use the uniform layout",
            field="structures.layout",
        )
    if "gguf" in spec.export.formats and shape.model_type not in GGUF_FAMILIES:
        raise UnsupportedModelError(
            f"export.formats: the GGUF export writes {', '.join(GGUF_FAMILIES)} models (llama.cpp's llama "
            f"architecture), not {shape.model_type!r}; drop gguf",
            field="export.formats",
        )
    quotas = plan_quotas(shape, spec.target_ratio, spec.structures, spec.analysis.gamma)
    return PreflightResult(model_path, shape, quotas)
