"""The export stage: write the pruned model as Hugging Face directories and prove they reload (ALGORITHM.md s. 4).

:func:`export` writes into a directory the caller owns (the pipeline's staging directory, renamed into place when
every artifact is there):

* ``model/`` - merged weights (``merge_lora``), or the pruned base when the LoRA stays separate;
* ``adapter/`` - the LoRA as a PEFT adapter, when asked for or not merged; its ``base_model_name_or_path`` is the
  sibling base directory's name (``model`` or ``pruned_base``), relative, never a server path (issue 7, item 8):
  ``AutoPeftModelForCausalLM.from_pretrained("adapter")`` works from the directory that holds both;
* ``pruned_base/`` - the pruned base the adapter fits, when the LoRA is merged into ``model/`` as well.

Checks before anything is reported done: the merged model's logits are finite and informative
(:func:`~lorashear.training.check_sane`); merging moved the logits only by rounding; ``model/`` reloads with stock
``AutoModelForCausalLM.from_pretrained`` (no missing, unexpected or mismatched keys) and computes what the pipeline
computed; the weights are stored in the input's dtype unless ``export.dtype`` says otherwise, and the file is
smaller than the input's (issue 7, item 7).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from lorashear.config import ExportConfig
from lorashear.errors import ConfigError, ExactnessError
from lorashear.families import get_family
from lorashear.modeling import count_params
from lorashear.training import check_sane

STAGE = "export"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_PORTABLE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_dropout",
)
"""Config keys a LLaMA-family model keeps when re-expressed as another family's stock class."""


def stock_loadable(model: nn.Module) -> tuple[nn.Module, str | None]:
    """A model whose config stock ``from_pretrained`` accepts, and a note when the class had to change.

    transformers 5's ``LlamaConfig`` refuses ``hidden_size % num_attention_heads != 0`` even with an explicit
    ``head_dim``, so a Llama whose head count no longer divides the hidden size cannot be saved or loaded as
    ``LlamaForCausalLM``. Its family (:mod:`lorashear.families`) names a stock class that computes the same
    function for a bias-free model (Mistral without sliding window: same modules and weight names, RoPE, RMSNorm,
    SwiGLU), and the model is re-expressed as it. The export's reload check compares logits, so any difference
    would fail the job. Models with biases never get here: the budget keeps their head count a divisor.

    A model whose layers differ in width (``structures.layout: per_layer``) becomes its family's per-layer class
    (:func:`lorashear.per_layer.as_per_layer`), which ``AutoModelForCausalLM`` loads once ``lorashear`` is imported.

    Raises:
        ValueError: the family needs divisible heads and has no stock class to re-express the model as, or has no
            per-layer class.
    """
    from lorashear import per_layer

    if not per_layer.is_uniform(model):
        out = per_layer.as_per_layer(model)
        note = (
            f"exported as {type(out).__name__} (per-layer layout: attention heads "
            f"{cast(Any, out.config).layer_num_attention_heads}, MLP channels "
            f"{cast(Any, out.config).layer_intermediate_size}); AutoModelForCausalLM.from_pretrained loads it once "
            "lorashear is imported"
        )
        return out, note
    cfg: Any = model.config
    family = get_family(cfg.model_type)
    if not family.heads_must_divide_hidden or cfg.hidden_size % cfg.num_attention_heads == 0:
        return model, None
    biased = bool(getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False))
    if family.export_as is None or biased:  # pragma: no cover - the budget forbids it
        raise ValueError(f"a {cfg.model_type} model with these sizes needs num_attention_heads to divide hidden_size")
    from transformers import AutoConfig, AutoModelForCausalLM

    src = cfg.to_dict()
    kwargs = {k: src[k] for k in _PORTABLE_KEYS if k in src}
    new_cfg = AutoConfig.for_model(family.export_as, **kwargs, sliding_window=None)
    out = per_layer.rebuild(model, new_cfg, AutoModelForCausalLM.from_config)
    note = (
        f"exported as {type(out).__name__}: the stock {cfg.model_type} config (transformers 5) rejects hidden_size "
        f"{cfg.hidden_size} with {cfg.num_attention_heads} attention heads; {family.export_as} computes the same "
        "function for a bias-free model"
    )
    return out.eval(), note


@dataclass
class ExportResult:
    """What :func:`export` wrote and checked.

    Attributes:
        artifacts: ``{artifact name: path relative to the export directory}`` (``model``, ``adapter``,
            ``pruned_base``).
        architecture: class of the reloaded ``model/`` (e.g. ``LlamaForCausalLM``).
        dtype: storage dtype of the weights.
        params: base parameters of ``model/``.
        file_bytes: size of ``model/``'s safetensors files.
        input_bytes: size of the input's weight files (``None`` when unknown).
        merge_max_abs_logit_diff: logit change from merging the LoRA (rounding only), ``None`` when not merged.
        reload_max_abs_logit_diff: reloaded ``model/`` (with its adapter when not merged) vs the pipeline's logits.
        note: why the class changed, if it did.
        gguf_max_abs_logit_diff: ``model.gguf`` loaded by transformers vs ``model/`` (``export.formats`` gguf).
    """

    artifacts: dict[str, str]
    architecture: str
    dtype: str
    params: int
    file_bytes: int
    input_bytes: int | None
    merge_max_abs_logit_diff: float | None
    reload_max_abs_logit_diff: float
    note: str | None = None
    checks: list[str] = field(default_factory=list)
    gguf_max_abs_logit_diff: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportResult:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


def _save(model: Any, tokenizer: Any, directory: Path) -> None:
    model.save_pretrained(str(directory))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))


def _point_adapter_at(adapter_dir: Path, base: str) -> None:
    """Rewrite ``adapter_config.json`` so the adapter names its pruned base by relative name."""
    path = adapter_dir / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = base
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def _logits(model: nn.Module, probe: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=probe.to(next(model.parameters()).device), use_cache=False).logits.float().cpu()


def _reload_check(
    directory: Path, cfg: ExportConfig, expected: torch.Tensor, probe: torch.Tensor, dtype: torch.dtype
) -> tuple[str, int, float]:
    from transformers import AutoModelForCausalLM

    loaded, info = cast(Any, AutoModelForCausalLM).from_pretrained(
        str(directory / "model"), output_loading_info=True, dtype=torch.float32, trust_remote_code=False
    )
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise ExactnessError(f"exported model does not reload cleanly: {bad}")
    check: nn.Module = loaded.to(probe.device)
    if not cfg.merge_lora:  # model/ is the pruned base: with its adapter it must compute what the pipeline computed
        from peft import PeftModel

        check = PeftModel.from_pretrained(check, str(directory / "adapter"))
    got = _logits(check, probe)
    diff = float((got - expected).abs().max())
    tol = (1e-4 if dtype == torch.float32 else 0.25) * max(1.0, float(expected.abs().max()) / 10)
    if diff > tol:
        raise ExactnessError(f"reloaded model's logits differ by {diff:.3g} from the pipeline's")
    return type(loaded).__name__, count_params(loaded), diff


def load_exported(directory: str | Path, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Load what :func:`export` wrote as one plain model: ``model/``, merged with ``adapter/`` when the LoRA was
    kept separate (the function is the same; speed is measured on it, issue 6).
    """
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    model: Any = AutoModelForCausalLM.from_pretrained(str(directory / "model"), dtype=dtype, trust_remote_code=False)
    if (directory / "adapter").is_dir() and not (directory / "pruned_base").is_dir():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(directory / "adapter")).merge_and_unload()
    return cast(nn.Module, model.to(device).eval())


def export(
    model: nn.Module,
    tokenizer: Any,
    cfg: ExportConfig,
    directory: str | Path,
    *,
    probe_ids: torch.Tensor,
    input_dtype: torch.dtype | None = None,
    input_bytes: int | None = None,
) -> ExportResult:
    """Write the pruned model (merged and/or base + adapter) into ``directory`` and check it reloads.

    Args:
        model: the pruned PEFT model; with ``merge_lora`` the LoRA is merged into it (it is consumed).
        tokenizer: saved beside every model directory (``None``: not saved).
        cfg: merge / adapter / dtype choices.
        directory: where ``model/`` (and ``adapter/``, ``pruned_base/``) are written; created if missing.
        probe_ids: ``(B, T)`` token ids for the merge, sanity and reload checks.
        input_dtype: dtype of the input's weights; ``export.dtype: auto`` stores in it (float32 when unknown).
        input_bytes: size of the input's weight files; the export must be smaller.

    Returns:
        :class:`ExportResult`.

    Raises:
        DivergedError: the final model's logits are not finite or carry no information.
        ExactnessError: merging or reloading changed the logits beyond rounding, or keys did not match.
        ConfigError: the exported weights are not smaller than the input's (``export.dtype``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    peft_model = cast(Any, model)
    dtype = DTYPES.get(cfg.dtype) or input_dtype or torch.float32
    probe = probe_ids.to(next(model.parameters()).device)
    reference = _logits(model, probe)
    artifacts: dict[str, str] = {}
    if cfg.save_adapter or not cfg.merge_lora:
        base_dir = "model" if not cfg.merge_lora else "pruned_base"
        peft_model.save_pretrained(str(directory / "adapter"))
        _point_adapter_at(directory / "adapter", base_dir)
        artifacts["adapter"] = "adapter"
        base = (copy.deepcopy(peft_model) if cfg.merge_lora else peft_model).unload()
        base, _ = stock_loadable(base)
        _save(base.to(dtype), tokenizer, directory / base_dir)
        artifacts[base_dir] = base_dir
    merge_diff = None
    note = None
    if cfg.merge_lora:
        merged = peft_model.merge_and_unload()
        merged.config.use_cache = True
        merged, note = stock_loadable(merged)
        check_sane(merged, probe, stage=STAGE)
        merged.to(dtype)
        expected = _logits(merged, probe)
        # merging s*B*A into W reorders fp32 sums: noise, but a wrong merge would be O(1)
        merge_diff = float((expected - reference).abs().max())
        scale = max(1.0, float(reference.abs().max()) / 10)
        if merge_diff > (1e-2 if dtype == torch.float32 else 0.5) * scale:
            raise ExactnessError(f"merging the LoRA changed the logits by {merge_diff:.3g}")
        _save(merged, tokenizer, directory / "model")
        artifacts["model"] = "model"
    else:
        expected = reference
    arch, params, reload_diff = _reload_check(directory, cfg, expected, probe, dtype)
    size = sum(f.stat().st_size for f in (directory / "model").glob("*.safetensors"))
    if input_bytes is not None and size >= input_bytes:
        raise ConfigError(
            f"export.dtype: the pruned model's weights take {size:,} bytes in {str(dtype).replace('torch.', '')}, "
            f"not less than the input's {input_bytes:,}; store them in the input's dtype (export.dtype: auto)",
            field="export.dtype",
        )
    return ExportResult(
        artifacts=artifacts,
        architecture=arch,
        dtype=str(dtype).replace("torch.", ""),
        params=params,
        file_bytes=size,
        input_bytes=input_bytes,
        merge_max_abs_logit_diff=merge_diff,
        reload_max_abs_logit_diff=reload_diff,
        note=note,
        checks=["sane_logits", "merge_rounding", "stock_reload", "smaller_than_input"],
    )
