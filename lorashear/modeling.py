"""Loading models and tokenizers, attaching LoRA, naming parameters.

Only local files: a Hugging Face directory with safetensors weights or a GGUF file (transformers' GGUF loader).
``trust_remote_code`` is never set, and ``.bin``/pickle checkpoints are refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from lorashear.budget import ModelShape
from lorashear.config import LoRAConfig
from lorashear.errors import AdapterMismatchError, ConfigError, ModelFileError, UnsupportedModelError
from lorashear.preflight import check_adapter, check_weights, read_model_config
from lorashear.training import norm_parameter_names

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when available else ``cpu``.

    Raises:
        ConfigError: CUDA requested but not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device={device!r} but CUDA is not available here", field="runtime.device")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> float32 on CPU, bfloat16 on CUDA (ALGORITHM.md section 7: fp16 on CPU fails).

    Raises:
        ConfigError: float16 on CPU.
    """
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == "float16" and device.type == "cpu":
        raise ConfigError("runtime.dtype=float16 is not supported on CPU", field="runtime.dtype")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_model(
    path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> nn.Module:
    """Load a LLaMA-family causal LM from a local directory (safetensors) or ``.gguf`` file.

    Args:
        path: model directory (``config.json`` + ``*.safetensors``) or a ``.gguf`` file.
        dtype: parameter dtype.
        device: where to put the weights.

    Returns:
        The model in eval mode with ``use_cache`` off in its config.

    Raises:
        UnsupportedModelError: unknown architecture, no safetensors weights.
        ModelFileError: weights that are broken or disagree with ``config.json`` (checked from the safetensors
            headers before loading), or any other failure to load them: a user error naming the file.
    """
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    path = Path(path)
    cfg = read_model_config(path)
    shape = ModelShape.from_config(cfg)  # raises for unsupported architectures before any weight is read
    if path.suffix != ".gguf":
        check_weights(path, shape)  # headers only: names, shapes, dtypes and file lengths against config.json
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": False}
    if path.suffix == ".gguf":
        from transformers import AutoConfig

        kwargs["gguf_file"] = path.name
        src = path.parent
        config = AutoConfig.from_pretrained(str(src), gguf_file=path.name, trust_remote_code=False)
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # llama.cpp writes -1 as 2**32 - 1
            value = getattr(config, key, None)
            if isinstance(value, int) and not 0 <= value < config.vocab_size:
                setattr(config, key, None)
        kwargs["config"] = config
    else:
        if not any(path.glob("*.safetensors")):
            raise UnsupportedModelError(
                f"{path.name} has no .safetensors weights (pickle checkpoints are refused)", field="model"
            )
        kwargs["use_safetensors"] = True
        src = path
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(str(src), **kwargs)
    except (MemoryError, torch.OutOfMemoryError):
        raise  # the machine's limit, not the user's files
    except Exception as exc:  # safetensors, transformers and torch raise many types for a broken file
        detail = str(exc).replace(str(path.parent), "").strip()[:300]
        raise ModelFileError(f"cannot load model {path.name}: {type(exc).__name__}: {detail}", field="model") from None
    if path.suffix == ".gguf":
        # transformers dequantises GGUF weights to ``dtype`` but keeps the quantizer attached, which makes
        # save_pretrained refuse the (plain float) model; the pruned export is an ordinary float checkpoint
        model.hf_quantizer = None
        model.is_quantized = False
        model.quantization_method = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.config.use_cache = False
    return model.to(device).eval()


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def stored_weights(path: str | Path) -> tuple[torch.dtype | None, int]:
    """The dtype most of a model's floating-point weights are stored in, and the weight files' total size in bytes.

    Reads only the safetensors headers. A GGUF file (quantised or not) reports ``(None, file size)``: its
    dequantised weights have no single storage dtype to keep.
    """
    path = Path(path)
    if path.suffix == ".gguf":
        return None, path.stat().st_size
    counts: dict[torch.dtype, int] = {}
    size = 0
    for f in sorted(path.glob("*.safetensors")):
        size += f.stat().st_size
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for key, meta in header.items():
            dt = _SAFETENSORS_DTYPES.get(meta.get("dtype")) if key != "__metadata__" else None
            if dt is not None:
                n = 1
                for d in meta.get("shape", []):
                    n *= int(d)
                counts[dt] = counts.get(dt, 0) + n
    return (max(counts, key=lambda k: counts[k]) if counts else None), size


def load_tokenizer(path: str | Path) -> Any:
    """Load the tokenizer stored with a model directory or GGUF file (never from a hub)."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    path = Path(path)
    if path.suffix == ".gguf":
        try:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
        except (IndexError, KeyError, ValueError, OSError) as exc:
            # some GGUF writers store -1 token ids; a Hugging Face tokenizer beside the file is used instead
            if not (path.parent / "tokenizer.json").is_file() and not (path.parent / "tokenizer.model").is_file():
                raise UnsupportedModelError(
                    f"cannot read the tokenizer embedded in {path.name} ({exc!r}) and there is no tokenizer.json "
                    "beside it",
                    field="model",
                ) from None
            tok = AutoTokenizer.from_pretrained(str(path.parent), trust_remote_code=False)
    else:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"  # ALGORITHM.md section 7: left padding + SDPA on CPU exploded gradients
    return tok


def model_shape(model: nn.Module) -> ModelShape:
    """Sizes of a loaded model, from its config."""
    return ModelShape.from_config(cast(Any, model).config.to_dict())


def count_params(model: nn.Module, *, include_lora: bool = False) -> int:
    """Parameters of the base model (tied weights counted once; LoRA excluded unless asked)."""
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if not include_lora and (".lora_A." in name or ".lora_B." in name or "lora_" in name.split(".")[-2:][0]):
            continue
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def attach_lora(model: nn.Module, cfg: LoRAConfig, *, adapter: Path | None = None) -> nn.Module:
    """Wrap ``model`` in a PEFT LoRA model; only the LoRA weights require gradients.

    Args:
        model: a causal LM from :func:`load_model`.
        cfg: rank, alpha, dropout, target modules (ignored when ``adapter`` is given).
        adapter: an existing PEFT LoRA adapter directory to load (trainable).

    Raises:
        AdapterMismatchError: the adapter does not fit the model (module names or shapes).
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter is not None:
        check_adapter(adapter, model_shape(model))
        try:
            peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise AdapterMismatchError(f"adapter does not fit the model: {exc}", field="adapter") from None
    else:
        peft_model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.rank,
                lora_alpha=cast(int, cfg.alpha),  # peft annotates int; a float alpha works
                lora_dropout=cfg.dropout,
                target_modules=list(cfg.target_modules),
                use_rslora=cfg.use_rslora,
                bias="none",
                task_type="CAUSAL_LM",
            ),
        )
    norms = set(norm_parameter_names(peft_model)) if cfg.train_norms else set()
    for name, p in peft_model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name or name in norms)
    return peft_model


def base_name(name: str) -> str:
    """Name of a parameter or module in the plain (merged) model: strips PEFT's wrappers.

    ``base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight`` ->
    ``model.layers.0.self_attn.q_proj.weight``.
    """
    if name.startswith("base_model.model."):
        name = name[len("base_model.model.") :]
    return name.replace(".base_layer", "")


def write_json(path: Path, data: Any) -> None:
    """Write JSON with a trailing newline (sorted keys for stable diffs)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
