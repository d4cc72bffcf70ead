"""GGUF export of the uniform layout (``export.formats: ["gguf"]``; issue 8), written with the ``gguf`` package.

The exported ``model/`` (safetensors) is re-written as one ``model.gguf`` that llama.cpp reads as architecture
``llama`` and transformers' GGUF loader reads back (``from_pretrained(dir, gguf_file=...)``):

* **Weights** in the export's dtype (F32, F16 or BF16; never re-quantised), with llama.cpp's tensor names and its
  rotary permutation of the query and key projections (the inverse of what its converter undoes on load).
* **Shape**: head counts, KV head count, ``key_length``/``value_length`` and ``rope.dimension_count`` = head_dim,
  since pruning removes heads but keeps head_dim, so ``hidden_size / heads`` no longer gives it (llama.cpp reads
  ``key_length``; transformers reads ``rope.dimension_count`` as ``head_dim``).
* **Tokenizer**: copied field by field from the input GGUF when the input was one (pruning never changes it;
  special-token ids outside the vocabulary, some converters' way of saying "none", are left out);
  otherwise built from the input's tokenizer: SentencePiece (``tokenizer.model``: pieces, scores, types) or
  byte-level BPE (``tokenizer.json``: vocabulary, merges), with the special token ids.

:func:`write_gguf` checks the file by loading it back with transformers and comparing logits with the HF export
(``max |diff|`` <= 1e-4 in float32); a file that fails is removed and the job fails. When the head count no
longer divides the hidden size, ``from_pretrained(gguf_file=...)`` cannot build the model (transformers 5's
``LlamaConfig`` refuses such sizes, the reason the HF export is a Mistral class,
:func:`~lorashear.compression.export.stock_loadable`), so the check runs the same loader's parts itself:
``load_gguf_checkpoint`` for the metadata, its llama tensor-name map and its reverse rotary permutation for the
weights, loaded into the HF export's class.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorashear.config import GGUF_FAMILIES
from lorashear.errors import ConfigError, ExactnessError

_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name of a transformers LLaMA tensor (``model.layers.3.mlp.up_proj.weight`` ->
    ``blk.3.ffn_up.weight``).

    Raises:
        ConfigError: a tensor the llama architecture has no place for (biases, extra modules).
    """
    if hf_name in _NAMES:
        return _NAMES[hf_name]
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER:
        return f"blk.{parts[2]}.{_LAYER[parts[3]]}"
    raise ConfigError(f"export.formats: the GGUF llama layout has no tensor for {hf_name!r}", field="export.formats")


def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder a query or key projection ``(n_heads * head_dim, hidden)`` from transformers' rotate-half layout to
    llama.cpp's interleaved one (each head's two halves interleaved); transformers' GGUF loader undoes it."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_from_gguf(writer: Any, source: Path) -> None:
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(source))
    n_tokens = len(reader.fields["tokenizer.ggml.tokens"].contents()) if "tokenizer.ggml.tokens" in reader.fields else 0
    for key, fld in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = fld.types[0]
        value = fld.contents()
        if key.endswith("_token_id") and isinstance(value, int) and not 0 <= value < n_tokens:
            continue  # "no such token" written as -1 / 2**32-1 by some converters: transformers cannot load it
        if vtype == GGUFValueType.ARRAY:
            writer.add_key_value(key, value, vtype, sub_type=fld.types[-1])
        else:
            writer.add_key_value(key, value, vtype)


def _tokenizer_from_hf(writer: Any, model_dir: Path, source: Path | None) -> None:
    spm = next(
        (d / "tokenizer.model" for d in (model_dir, source) if d is not None and (d / "tokenizer.model").is_file()),
        model_dir / "tokenizer.model",
    )
    cfg = (
        json.loads((model_dir / "tokenizer_config.json").read_text())
        if (model_dir / "tokenizer_config.json").is_file()
        else {}
    )
    if spm.is_file():
        import sentencepiece as sp  # a dependency of the package

        proc = sp.SentencePieceProcessor(model_file=str(spm))
        pieces: list[bytes] = []
        scores: list[float] = []
        types: list[int] = []
        for i in range(proc.vocab_size()):
            pieces.append(proc.id_to_piece(i).encode("utf-8"))
            scores.append(float(proc.get_score(i)))
            kind = 1  # normal
            if proc.is_unknown(i):
                kind = 2
            elif proc.is_control(i):
                kind = 3
            elif proc.is_unused(i):
                kind = 5
            elif proc.is_byte(i):
                kind = 6
            types.append(kind)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(pieces)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        for name, fn in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id)):
            tid = getattr(proc, f"{name}_id")()
            if tid >= 0:
                fn(tid)
        if proc.unk_id() >= 0:
            writer.add_unk_token_id(proc.unk_id())
    else:
        data = json.loads((model_dir / "tokenizer.json").read_text())
        model = data.get("model") or {}
        if model.get("byte_fallback"):  # converted from SentencePiece: llama.cpp needs the .model's scores
            raise ConfigError(
                "export.formats: GGUF needs this model's SentencePiece tokenizer.model (its tokenizer.json is a "
                "conversion without the piece scores); put tokenizer.model beside the input model",
                field="export.formats",
            )
        if model.get("type") != "BPE":
            raise ConfigError(
                "export.formats: GGUF needs a SentencePiece tokenizer.model or a BPE tokenizer.json; this model's "
                f"tokenizer is {model.get('type')!r}",
                field="export.formats",
            )
        vocab: dict[str, int] = dict(model["vocab"])
        added = {t["content"]: t for t in data.get("added_tokens", [])}
        for content, t in added.items():
            vocab.setdefault(content, int(t["id"]))
        size = max(vocab.values()) + 1
        tokens = [f"[PAD{i}]" for i in range(size)]
        types = [5] * size  # unused until filled
        for tok, i in vocab.items():
            tokens[i] = tok
            types[i] = 3 if tok in added and added[tok].get("special") else (4 if tok in added else 1)
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        for name, fn in (
            ("bos_token", writer.add_bos_token_id),
            ("eos_token", writer.add_eos_token_id),
            ("unk_token", writer.add_unk_token_id),
            ("pad_token", writer.add_pad_token_id),
        ):
            value = cfg.get(name)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str) and value in vocab:
                fn(vocab[value])
    template = cfg.get("chat_template")
    if isinstance(template, str):
        writer.add_chat_template(template)


def write_gguf(model_dir: Path, out: Path, *, source: Path | None, probe_ids: torch.Tensor) -> float:
    """Write ``out`` (a ``.gguf`` file) from the exported HF ``model_dir`` and check it reloads.

    Args:
        model_dir: the uniform-layout export (``config.json``, safetensors, tokenizer files).
        out: the GGUF file to write.
        source: the job's input: a ``.gguf`` file (its tokenizer fields are copied) or a model directory (its
            SentencePiece ``tokenizer.model``, which ``model_dir`` may lack, is read); ``None``: ``model_dir`` only.
        probe_ids: ``(B, T)`` token ids for the reload check.

    Returns:
        The largest absolute logit difference between transformers' load of ``out`` and ``model_dir``.

    Raises:
        ConfigError: a family, layout, dtype or tokenizer the GGUF llama layout cannot hold (``export.formats``).
        ExactnessError: the GGUF file computes other logits than the HF export (the file is removed).
    """
    from gguf import GGUFWriter, LlamaFileType
    from safetensors import safe_open

    cfg = json.loads((model_dir / "config.json").read_text())
    mtype = cfg.get("model_type")
    if mtype not in GGUF_FAMILIES:
        raise ConfigError(
            f"export.formats: GGUF export supports {', '.join(GGUF_FAMILIES)} models, not {mtype!r}",
            field="export.formats",
        )
    if cfg.get("rope_scaling") or (cfg.get("rope_parameters") or {}).get("rope_type", "default") != "default":
        raise ConfigError("export.formats: GGUF export of RoPE scaling is not supported", field="export.formats")
    n_heads, n_kv = int(cfg["num_attention_heads"]), int(cfg["num_key_value_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // n_heads)
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    files = sorted(model_dir.glob("*.safetensors"))
    dtype_name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    ftype = {
        "float32": LlamaFileType.ALL_F32,
        "float16": LlamaFileType.MOSTLY_F16,
        "bfloat16": LlamaFileType.MOSTLY_BF16,
    }
    if dtype_name not in ftype:
        raise ConfigError(f"export.formats: no GGUF file type for dtype {dtype_name!r}", field="export.formats")

    name = str(cfg.get("_name_or_path") or "model").rsplit("/", 1)[-1] or "model"
    description = f"{name}, structurally pruned by LoRAShear ({n_heads} attention heads of {head_dim})"
    tmp = out.with_name(out.name + ".partial")
    writer = GGUFWriter(str(tmp), arch="llama")
    try:
        writer.add_name(name)
        writer.add_description(description)
        writer.add_context_length(int(cfg.get("max_position_embeddings") or 2048))
        writer.add_embedding_length(hidden)
        writer.add_block_count(int(cfg["num_hidden_layers"]))
        writer.add_feed_forward_length(int(cfg["intermediate_size"]))
        writer.add_head_count(n_heads)
        writer.add_head_count_kv(n_kv)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(theta))
        writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps") or 1e-5))
        writer.add_vocab_size(int(cfg["vocab_size"]))
        writer.add_file_type(ftype[dtype_name])
        if source is not None and source.suffix == ".gguf":
            _tokenizer_from_gguf(writer, source)
        else:
            _tokenizer_from_hf(writer, model_dir, source if source is not None and source.is_dir() else None)
        tied = bool(cfg.get("tie_word_embeddings"))
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                    if key == "lm_head.weight" and tied:
                        continue
                    t = st.get_tensor(key)
                    arr = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
                    if key.endswith("self_attn.q_proj.weight"):
                        arr = permute_rotary(arr, n_heads)
                    elif key.endswith("self_attn.k_proj.weight"):
                        arr = permute_rotary(arr, n_kv)
                    if t.dtype == torch.bfloat16:
                        from gguf import GGMLQuantizationType
                        from gguf.quants import quantize

                        writer.add_tensor(
                            gguf_name(key),
                            quantize(arr, GGMLQuantizationType.BF16),
                            raw_dtype=GGMLQuantizationType.BF16,
                        )
                    else:
                        writer.add_tensor(gguf_name(key), np.ascontiguousarray(arr))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    try:
        diff = check_gguf(model_dir, tmp, probe_ids, dtype_name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return diff


@torch.no_grad()
def check_gguf(model_dir: Path, gguf_file: Path, probe_ids: torch.Tensor, dtype_name: str = "float32") -> float:
    """Load ``gguf_file`` with transformers' GGUF loader and compare its logits with ``model_dir``'s on
    ``probe_ids``.

    Returns:
        ``max |logits_gguf - logits_hf|``.

    Raises:
        ExactnessError: over 1e-4 (float32; scaled by the logits' magnitude) or 0.25 (16-bit).
    """
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, trust_remote_code=False).eval()
    cfg = hf.config
    if cfg.hidden_size % cfg.num_attention_heads == 0:  # the whole stock loader
        with tempfile.TemporaryDirectory(prefix="lorashear-gguf-") as d:
            link = Path(d) / "model.gguf"
            try:
                link.symlink_to(gguf_file.resolve())
            except OSError:  # pragma: no cover - no symlinks on this filesystem
                shutil.copyfile(gguf_file, link)
            gg = AutoModelForCausalLM.from_pretrained(
                d, gguf_file="model.gguf", dtype=torch.float32, trust_remote_code=False
            ).eval()
    else:
        gg = _load_with_loader_parts(gguf_file, hf)
    probe = probe_ids.cpu()
    a = hf(input_ids=probe, use_cache=False).logits.float()
    b = gg(input_ids=probe, use_cache=False).logits.float()
    diff = float((a - b).abs().max())
    tol = (1e-4 if dtype_name == "float32" else 0.25) * max(1.0, float(a.abs().max()) / 10)
    if not diff <= tol:
        raise ExactnessError(f"the GGUF file's logits differ by {diff:.3g} from the HF export's (allowed {tol:.2g})")
    return diff


def _load_with_loader_parts(gguf_file: Path, like: Any) -> Any:
    """The GGUF file's weights, read with transformers' GGUF loader functions (metadata, llama name map, reverse
    rotary permutation, dequantisation), into a fresh model of ``like``'s class and config."""
    import copy

    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import (
        LlamaTensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    parsed = load_gguf_checkpoint(str(gguf_file), return_tensors=False)
    meta = parsed["config"]
    cfg = like.config
    for key, want in (
        ("num_attention_heads", cfg.num_attention_heads),
        ("num_key_value_heads", cfg.num_key_value_heads),
        ("num_hidden_layers", cfg.num_hidden_layers),
        ("intermediate_size", cfg.intermediate_size),
        ("hidden_size", cfg.hidden_size),
        ("head_dim", cfg.head_dim),
    ):
        if meta.get(key) != want:
            raise ExactnessError(f"the GGUF file says {key} = {meta.get(key)!r}, the HF export {want!r}")
    processor = LlamaTensorProcessor(config=meta)
    mapping = get_gguf_hf_weights_map(like, processor, model_type="llama")
    state = {}
    for tensor in GGUFReader(str(gguf_file)).tensors:
        result = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name)
        if result.name in mapping:
            state[mapping[result.name]] = torch.from_numpy(np.copy(result.weights)).float()
    model = copy.deepcopy(like)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise ExactnessError(f"the GGUF file's tensors do not fill the model: missing {missing}, extra {unexpected}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
