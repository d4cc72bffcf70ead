"""GGUF export (issue 8): a pruned job's ``model.gguf`` computes the HF export's logits through transformers'
GGUF loader, carries a tokenizer that encodes like the HF one, and a wrong file never survives."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lorashear.compression import gguf_export
from lorashear.compression.gguf_export import check_gguf, gguf_name, write_gguf
from lorashear.config import JobSpec
from lorashear.errors import ConfigError, ExactnessError
from lorashear.modeling import load_model, load_tokenizer
from lorashear.pipeline import run
from lorashear.resolve import BUNDLED_MODEL_ROOT

ROOT = Path(__file__).resolve().parents[2]
STORIES = BUNDLED_MODEL_ROOT / "stories260K"
STORIES_GGUF = BUNDLED_MODEL_ROOT / "stories260K-gguf" / "stories260K.gguf"
TEXT = "Once upon a time, there was a little girl named Lily. She loved to play outside."
SPEC = {
    "model": "stories260K",
    "target_ratio": 0.2,
    "export": {"formats": ["safetensors", "gguf"]},
    "lhspg": {"warmup_steps": 2, "periods": 2, "period_steps": 2, "batch_size": 4, "seq_len": 64},
    "recovery": {"rounds": 1, "steps_per_round": 2, "batch_size": 4, "seq_len": 64},
    "analysis": {"max_tokens": 1024},
    "evaluation": {"max_windows": 4, "zeroshot": {"enabled": False}, "speed": {"enabled": False}},
}


def _probe() -> torch.Tensor:
    return torch.arange(1, 33).reshape(1, 32) * 7 % 500


@pytest.mark.slow
def test_job_writes_a_gguf_that_transformers_reads_back_exactly(tmp_path: Path) -> None:
    res = run(JobSpec.from_dict(SPEC), tmp_path / "out")
    out = tmp_path / "out"
    assert res.artifacts["gguf"] == out / "model.gguf" and (out / "model.gguf").is_file()
    report = json.loads((out / "report.json").read_text())["export"]
    assert report["gguf_max_abs_logit_diff"] <= 1e-4 and "gguf_reload" in report["checks"]
    assert not list(out.glob("*.partial"))
    # 6 of 8 heads kept: the head count no longer divides hidden 64 (the HF export is a Mistral class); the
    # file still records llama.cpp's llama architecture with head_dim 8
    from gguf import GGUFReader

    fields = GGUFReader(str(out / "model.gguf")).fields
    arch = fields["general.architecture"].contents()
    assert arch == "llama"
    assert fields["llama.attention.key_length"].contents() == 8
    assert (
        fields["llama.attention.head_count"].contents()
        == json.loads((out / "model" / "config.json").read_text())["num_attention_heads"]
    )
    # the tokenizer inside the file is the model's SentencePiece vocabulary (transformers' AutoTokenizer cannot
    # open this file: it builds the LlamaConfig first, which refuses 6 heads over 64; llama.cpp reads it)
    import sentencepiece as sp

    proc = sp.SentencePieceProcessor(model_file=str(STORIES / "tokenizer.model"))
    assert fields["tokenizer.ggml.tokens"].contents() == [proc.id_to_piece(i) for i in range(proc.vocab_size())]
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    # an independent re-check, logits within 1e-4
    assert check_gguf(out / "model", out / "model.gguf", _probe()) <= 1e-4


def test_stock_loader_round_trip_and_tokenizer_copied_from_a_gguf_input(tmp_path: Path) -> None:
    """A model whose heads divide the hidden size goes through ``from_pretrained(gguf_file=...)`` itself; a GGUF
    input's tokenizer fields are copied as they are."""
    model = load_model(STORIES_GGUF)
    hf_dir = tmp_path / "hf"
    model.save_pretrained(str(hf_dir))
    load_tokenizer(STORIES_GGUF).save_pretrained(str(hf_dir))
    diff = write_gguf(hf_dir, tmp_path / "model.gguf", source=STORIES_GGUF, probe_ids=_probe())
    assert diff <= 1e-4
    from gguf import GGUFReader

    src = GGUFReader(str(STORIES_GGUF)).fields
    dst = GGUFReader(str(tmp_path / "model.gguf")).fields
    keys = [k for k in src if k.startswith("tokenizer.")]
    assert "tokenizer.ggml.tokens" in keys and "tokenizer.ggml.scores" in keys
    for key in keys:
        if src[key].contents() == 2**32 - 1:  # "no such token": left out, transformers cannot load it
            assert key.endswith("_token_id") and key not in dst
            continue
        assert dst[key].contents() == src[key].contents(), key
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf", dtype=torch.float32)
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert load_tokenizer(tmp_path / "model.gguf")(TEXT).input_ids == load_tokenizer(STORIES_GGUF)(TEXT).input_ids


def test_sentencepiece_tokenizer_built_from_an_hf_directory(tmp_path: Path) -> None:
    hf_dir = tmp_path / "hf"
    shutil.copytree(STORIES, hf_dir)
    assert write_gguf(hf_dir, tmp_path / "model.gguf", source=None, probe_ids=_probe()) <= 1e-4
    assert load_tokenizer(tmp_path / "model.gguf")(TEXT).input_ids == load_tokenizer(hf_dir)(TEXT).input_ids


def test_a_wrong_file_fails_and_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hf_dir = tmp_path / "hf"
    shutil.copytree(STORIES, hf_dir)
    monkeypatch.setattr(gguf_export, "permute_rotary", lambda w, n: w)  # forget llama.cpp's rotary layout
    with pytest.raises(ExactnessError, match="differ"):
        write_gguf(hf_dir, tmp_path / "model.gguf", source=None, probe_ids=_probe())
    assert list(tmp_path.glob("model.gguf*")) == []


def test_gguf_spec_rules() -> None:
    base = {"model": "stories260K", "target_ratio": 0.2}
    ok = JobSpec.from_dict({**base, "export": {"formats": ["safetensors", "gguf"]}})
    assert ok.export.formats == ["safetensors", "gguf"]
    assert JobSpec.from_dict(base).export.formats == ["safetensors"]
    bad = [
        ({"export": {"formats": ["gguf"]}}, "export.formats"),  # the HF export is always written
        ({"export": {"formats": ["safetensors", "onnx"]}}, "export.formats[1]"),
        ({"export": {"formats": ["safetensors", "gguf", "gguf"]}}, "export.formats"),
        ({"export": {"formats": ["safetensors", "gguf"], "merge_lora": False}}, "export.formats"),
        ({"export": {"formats": ["safetensors", "gguf"]}, "structures": {"layout": "per_layer"}}, "export.formats"),
    ]
    for extra, field in bad:
        with pytest.raises(ConfigError) as e:
            JobSpec.from_dict({**base, **extra})
        assert e.value.field == field, extra
    assert gguf_name("model.layers.3.mlp.up_proj.weight") == "blk.3.ffn_up.weight"
    with pytest.raises(ConfigError):
        gguf_name("model.layers.0.self_attn.q_proj.bias")


@pytest.mark.slow
def test_a_failed_export_leaves_no_output_or_staging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise ExactnessError("the GGUF file's logits differ")

    monkeypatch.setattr(gguf_export, "write_gguf", broken)
    with pytest.raises(ExactnessError):
        run(JobSpec.from_dict(SPEC), tmp_path / "out", work_dir=tmp_path / "work")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # no out/, no .out.staging-*


NODE_LLAMA_CPP = os.environ.get("NODE_LLAMA_CPP")  # a node_modules directory holding node-llama-cpp


@pytest.mark.slow
@pytest.mark.skipif(
    not NODE_LLAMA_CPP or shutil.which("node") is None,
    reason="set NODE_LLAMA_CPP to a node_modules with node-llama-cpp (npm install node-llama-cpp@3) to run llama.cpp",
)
def test_llama_cpp_reads_the_pruned_gguf_like_transformers(tmp_path: Path) -> None:
    """llama.cpp itself (node-llama-cpp's prebuilt binary) tokenizes like the HF tokenizer and continues greedily
    with the same tokens as transformers, on a pruned model whose head count no longer divides the hidden size."""
    from transformers import AutoModelForCausalLM

    run(JobSpec.from_dict(SPEC), tmp_path / "out")
    out = tmp_path / "out"
    tok = load_tokenizer(out / "model")
    ids = tok(TEXT).input_ids
    model = AutoModelForCausalLM.from_pretrained(str(out / "model"), dtype=torch.float32).eval()
    with torch.no_grad():
        hf = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids) :].tolist()
    proc = subprocess.run(
        ["node", str(ROOT / "scripts" / "llamacpp_greedy.mjs"), str(out / "model.gguf"), json.dumps(ids), "24", TEXT],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NODE_PATH": NODE_LLAMA_CPP or ""},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["out"] == hf
    assert got["tokens"] == tok(TEXT, add_special_tokens=False).input_ids
