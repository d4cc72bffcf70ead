"""Kinds of broken model directory, each made from a copy of the bundled stories260K (pure Python: the
safetensors files are rewritten from their headers, no torch)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from lorashear.resolve import BUNDLED_MODEL_ROOT

SOURCE = BUNDLED_MODEL_ROOT / "stories260K"


def read_st(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """``{name: (dtype, shape, raw bytes)}`` of a safetensors file."""
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    header.pop("__metadata__", None)
    data = blob[8 + n :]
    return {k: (v["dtype"], v["shape"], data[v["data_offsets"][0] : v["data_offsets"][1]]) for k, v in header.items()}


def write_st(path: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    """Write a well-formed safetensors file."""
    header, chunks, offset = {}, [], 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(chunks))


def _config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _tensors(d: Path, edit: Callable[[dict], None]) -> None:
    t = read_st(d / "model.safetensors")
    edit(t)
    write_st(d / "model.safetensors", t)


def _truncate(d: Path) -> None:
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _shard(d: Path, weight_map_edit: Callable[[dict], None] | None = None, drop_shard: bool = False) -> None:
    t = read_st(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = list(t)
    half = len(names) // 2
    write_st(d / "model-00001-of-00002.safetensors", {k: t[k] for k in names[:half]})
    write_st(d / "model-00002-of-00002.safetensors", {k: t[k] for k in names[half:]})
    wm = {
        k: ("model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors")
        for i, k in enumerate(names)
    }
    if weight_map_edit:
        weight_map_edit(wm)
    if drop_shard:
        (d / "model-00002-of-00002.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def _swap_kproj(t: dict) -> None:
    dtype, shape, raw = t["model.layers.1.self_attn.k_proj.weight"]
    t["model.layers.1.self_attn.k_proj.weight"] = (dtype, shape[::-1], raw)


def _int_norm(t: dict) -> None:
    dtype, shape, raw = t["model.norm.weight"]
    t["model.norm.weight"] = ("I32", shape, raw)


def _tokenizer_beyond_vocab(d: Path) -> None:
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["added_tokens"].append({**tok["added_tokens"][-1], "id": 700, "content": "<extra>"})
    (d / "tokenizer.json").write_text(json.dumps(tok))


BROKEN: dict[str, Callable[[Path], None]] = {
    "truncated-safetensors": _truncate,
    "empty-safetensors": lambda d: (d / "model.safetensors").write_bytes(b""),
    "header-length-garbage": lambda d: (d / "model.safetensors").write_bytes(
        (2**62).to_bytes(8, "little") + (d / "model.safetensors").read_bytes()[8:]
    ),
    "header-not-json": lambda d: (d / "model.safetensors").write_bytes(
        (64).to_bytes(8, "little") + b"\xff" * 64 + (d / "model.safetensors").read_bytes()[72:]
    ),
    "trailing-garbage": lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes() + b"\0" * 4096
    ),
    "vocab-mismatch": lambda d: _config(d, vocab_size=1024),
    "hidden-size-mismatch": lambda d: _config(d, hidden_size=128, head_dim=16),
    "intermediate-mismatch": lambda d: _config(d, intermediate_size=256),
    "layers-1e9": lambda d: _config(d, num_hidden_layers=1_000_000_000),
    "layers-too-few": lambda d: _config(d, num_hidden_layers=4),
    "heads-1e9": lambda d: _config(d, num_attention_heads=1_000_000_000, num_key_value_heads=1_000_000_000),
    "missing-tensor": lambda d: _tensors(d, lambda t: t.pop("model.layers.2.mlp.up_proj.weight")),
    "missing-lm-head-untied": lambda d: _config(d, tie_word_embeddings=False),
    "transposed-tensor": lambda d: _tensors(d, _swap_kproj),
    "integer-dtype": lambda d: _tensors(d, _int_norm),
    "tokenizer-beyond-vocab": _tokenizer_beyond_vocab,
    "no-weights": lambda d: (d / "model.safetensors").unlink(),
    "config-not-json": lambda d: (d / "config.json").write_text("{not json"),
    "unsupported-architecture": lambda d: _config(d, model_type="gpt2"),
    "shard-outside-dir": lambda d: _shard(d, lambda wm: wm.update({next(iter(wm)): "../../etc/passwd"})),
    "shard-missing": lambda d: _shard(d, drop_shard=True),
    "shard-lacks-tensor": lambda d: _shard(
        d, lambda wm: wm.update({"model.norm.weight": "model-00001-of-00002.safetensors"})
    ),
}
"""Name -> how to break a fresh copy of stories260K."""


def make(root: Path, name: str, source: Path = SOURCE) -> Path:
    """A broken copy ``root/<name>``."""
    d = root / name
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(source, d)
    BROKEN[name](d)
    return d


def make_all(root: Path) -> dict[str, Path]:
    """Every kind under ``root``, plus an intact ``stories260K`` and a correctly sharded ``sharded-ok``."""
    root.mkdir(parents=True, exist_ok=True)
    out = {name: make(root, name) for name in BROKEN}
    shutil.copytree(SOURCE, root / "stories260K", dirs_exist_ok=True)
    ok = root / "sharded-ok"
    if not ok.exists():
        shutil.copytree(SOURCE, ok)
        _shard(ok)
    return out
