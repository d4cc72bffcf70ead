"""The pipeline on the real bundled model: end to end from the CLI, resume after cancel and kill, inputs."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorashear.config import JobSpec
from lorashear.errors import Cancelled, ConfigError
from lorashear.events import STAGES
from lorashear.pipeline import run
from lorashear.resolve import BUNDLED_DATA_ROOT, BUNDLED_MODEL_ROOT, Roots

from .conftest import FAST

E2E = {
    "model": "stories260K",
    "target_ratio": 0.2,
    "lhspg": {"warmup_steps": 10, "periods": 3, "period_steps": 10, "batch_size": 8, "seq_len": 128},
    "recovery": {"rounds": 2, "steps_per_round": 25, "batch_size": 8, "seq_len": 128, "eval_batches": 4},
    "analysis": {"max_tokens": 4096},
    "evaluation": {"window": 128, "max_windows": 64},
}


def spec_of(extra: dict | None = None, **over) -> JobSpec:
    d = copy.deepcopy({"model": "stories260K", "target_ratio": 0.2, **FAST})
    for k, v in (extra or {}).items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    d.update(over)
    return JobSpec.from_dict(d)


def english_ratio(text: str) -> float:
    vocab = set(re.findall(r"[a-z]+", (BUNDLED_DATA_ROOT / "tinystories" / "train_narrative.txt").read_text().lower()))
    words = re.findall(r"[a-z]+", text.lower())
    return sum(w in vocab for w in words) / max(len(words), 1)


@pytest.mark.slow
def test_cli_end_to_end_on_bundled_model(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(E2E))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "lorashear.cli", "run", str(spec), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "perplexity" in proc.stdout and "prune" in proc.stderr  # summary and progress
    report = json.loads((out / "report.json").read_text())
    s = report["summary"]
    # every figure is in the report
    for key in (
        "params_before",
        "params_after",
        "params_target",
        "ppl_dense",
        "ppl_pruned",
        "ppl_recovered",
        "max_abs_logit_diff",
        "compression_ratio",
    ):
        assert key in s
    for key in ("analysis", "lhspg", "compression", "recovery", "perplexity", "timings", "environment", "model"):
        assert report[key], key
    # zero-shot (dense vs final, lm-eval) and measured speed with their protocols (issue 6)
    zs, sp = report["zeroshot"], report["speed"]
    assert set(zs["dense"]["tasks"]) == set(zs["final"]["tasks"]) >= {"piqa", "arc_easy", "winogrande"}
    assert all(t["n"] == 20 and 0 <= t["acc"] <= 1 for t in zs["final"]["tasks"].values())
    assert zs["protocol"]["lm_eval_version"].startswith("0.4") and zs["protocol"]["limit"] == 20
    for side in ("dense", "final"):  # per-document outcomes agree with lm-eval's aggregate scores
        for t in zs[side]["tasks"].values():
            assert len(t["outcomes"]) == 20 and t["outcomes"].count("1") / 20 == pytest.approx(t["score"])
    paired = zs["paired"]  # the change on the same documents is the change of the scores
    assert paired["avg"] == pytest.approx(zs["final"]["avg"] - zs["dense"]["avg"]) and paired["avg_se"] >= 0
    assert "paired standard error" in proc.stdout
    assert [r["batch"] for r in sp["comparison"]["rows"]] == [1, 8]
    assert sp["comparison"]["ideal"]["params"] > 1.2 and sp["dense"]["rows"][0]["decode_tokens_per_s"] > 0
    assert s["zeroshot_avg_final"] == zs["final"]["avg"] and s["decode_speedup_b1"] > 0
    assert "zero-shot accuracy" in proc.stdout and "speed" in proc.stdout
    assert report["analysis"]["layer_map"] and report["recovery"]["rounds"]
    assert report["model"]["checksums_sha256"]["model.safetensors"]
    # the pictures (issue 8): a real PNG of the figure size, with every step's loss behind its curves
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 30_000
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1320, 990)
    lh = E2E["lhspg"]
    assert len(report["lhspg"]["losses"]) == lh["warmup_steps"] + lh["periods"] * lh["period_steps"]
    assert len(report["recovery"]["losses"]) > 0 and "plots" in proc.stdout
    # 20% fewer parameters within one budget step
    assert abs(s["params_after"] - s["params_target"]) <= s["params_tolerance"]
    assert abs(s["compression_ratio"] - 0.2) < 0.01
    assert s["max_abs_logit_diff"] < 1e-4
    assert s["ppl_recovered"] < s["ppl_pruned"]
    # loads with stock from_pretrained, no missing or unexpected keys, smaller on disk
    model, info = AutoModelForCausalLM.from_pretrained(str(out / "model"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert sum(p.numel() for p in model.parameters()) == s["params_after"]
    assert report["model"]["pruned_file_bytes"] < report["model"]["dense_file_bytes"]
    tok = AutoTokenizer.from_pretrained(str(out / "model"))
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    text = tok.decode(model.generate(input_ids=ids, max_new_tokens=40, do_sample=False)[0], skip_special_tokens=True)
    assert english_ratio(text) > 0.9, text
    assert len(text.split()) > 20
    plan = json.loads((out / "plan.json").read_text())
    assert plan["config"]["head_dim"] == 8 and plan["tensors"]


def run_collect(spec: JobSpec, out: Path, work: Path, cancel_at: tuple[str, int] | None = None):
    seen = {"n": 0}

    def on_event(e) -> None:
        if cancel_at and e.stage == cancel_at[0] and e.kind == "progress":
            seen["n"] = e.step

    def should_cancel() -> bool:
        return bool(cancel_at) and seen["n"] >= cancel_at[1]

    return run(spec, out, roots=Roots(), work_dir=work, on_event=on_event, should_cancel=should_cancel)


def same_weights(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("ref")
    return tmp / "ref", run_collect(spec_of(), tmp / "ref", tmp / "ref.work")


def checkpointed_at(work: Path) -> str:
    """Where a checkpoint stands: the stage of the interrupted loop, or ``after <last finished stage>``."""
    state = json.loads((work / "checkpoint" / "state.json").read_text())
    if state["loop"]:
        return state["loop"]["stage"]
    return f"after {STAGES[state['run']['stage_done']]}"


@pytest.mark.parametrize(
    "where, expect",
    [
        (("analyze", 2), "after discover"),  # inside the analysis: it is redone (issue 10: crashed with KeyError)
        (("prune", 5), "prune"),  # inside the LHSPG loop
        (("compress", 2), "after compress"),  # at a stage boundary
        (("recover", 2), "recover"),  # inside the recovery loop
    ],
)
def test_cancelled_run_resumes_to_the_same_result(
    tmp_path: Path, where: tuple[str, int], expect: str, reference
) -> None:
    spec = spec_of()
    ref_dir, ref = reference
    with pytest.raises(Cancelled):
        run_collect(spec, tmp_path / "out", tmp_path / "work", cancel_at=where)
    assert not (tmp_path / "out").exists(), "no half-written artifacts"
    assert checkpointed_at(tmp_path / "work") == expect
    resumed = run_collect(spec, tmp_path / "out", tmp_path / "work")
    same_weights(ref_dir, tmp_path / "out")
    assert resumed.summary == ref.summary
    assert not (tmp_path / "work" / "checkpoint").exists()


@pytest.mark.slow
def test_killed_cli_run_resumes_to_the_same_result(tmp_path: Path) -> None:
    d = copy.deepcopy({"model": "stories260K", "target_ratio": 0.2, **FAST})
    d["lhspg"] = {**d["lhspg"], "warmup_steps": 10, "periods": 3, "period_steps": 10}
    d["runtime"] = {"checkpoint_every": 3}
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(d))
    cmd = [sys.executable, "-m", "lorashear.cli", "run", str(spec), "-q"]
    ref = subprocess.run([*cmd, "-o", str(tmp_path / "ref")], capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    proc = subprocess.Popen([*cmd, "-o", str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    state = tmp_path / "out.work" / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        if state.exists() and (json.loads(state.read_text()).get("loop") or {}).get("stage") == "prune":
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "out").exists()
    again = subprocess.run([*cmd, "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    same_weights(tmp_path / "ref", tmp_path / "out")


def test_existing_adapter_and_separate_export(tmp_path: Path) -> None:
    """The LoRA-adapted model case: a PEFT adapter in, a pruned base plus a matching adapter out."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorashear.config import LoRAConfig
    from lorashear.modeling import attach_lora, load_model

    root = tmp_path / "models"
    root.mkdir()
    shutil.copytree(BUNDLED_MODEL_ROOT / "stories260K", root / "stories260K")  # symlinks out of a root are refused
    torch.manual_seed(3)
    adapted = attach_lora(
        load_model(BUNDLED_MODEL_ROOT / "stories260K"),
        LoRAConfig(rank=4, target_modules=["q_proj", "v_proj", "up_proj"]),
    )
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    adapted.save_pretrained(str(root / "my-adapter"))
    spec = spec_of({"export": {"merge_lora": False}}, adapter="my-adapter")
    res = run(spec, tmp_path / "out", roots=Roots(root, BUNDLED_DATA_ROOT), work_dir=tmp_path / "w")
    assert set(res.artifacts) >= {"model", "adapter", "plan", "report"}
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "model"))
    assert sum(p.numel() for p in base.parameters()) == res.summary["params_after"]
    peft = PeftModel.from_pretrained(base, str(tmp_path / "out" / "adapter"))  # shapes match the pruned base
    assert peft.peft_config["default"].r == 4


def test_gguf_input(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from lorashear.modeling import load_model

    # a dequantised GGUF model saves as a plain float checkpoint (transformers keeps a quantizer attached)
    load_model(BUNDLED_MODEL_ROOT / "stories260K-gguf" / "stories260K.gguf").save_pretrained(str(tmp_path / "f"))
    _, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "f"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    spec = spec_of(model="stories260K-gguf/stories260K.gguf")
    res = run(spec, tmp_path / "out", roots=Roots(), work_dir=tmp_path / "w")
    assert res.summary["params_before"] == 292_800  # untied output head in this GGUF
    assert abs(res.summary["params_after"] - res.summary["params_target"]) <= res.summary["params_tolerance"]


def test_output_directory_must_not_exist(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        run(spec_of(), tmp_path / "out")


def test_hsp_mode_and_hidden_dimension(tmp_path: Path) -> None:
    spec = spec_of({"lhspg": {"mode": "hsp"}, "structures": {"hidden": True}, "recovery": {"enabled": False}})
    res = run(spec, tmp_path / "out", work_dir=tmp_path / "w")
    assert res.report["quotas"]["hidden"] > 0
    assert res.report["compression"]["exact"] is True  # RMSNorm's weight and epsilon rescaled
    assert res.report["compression"]["max_abs_logit_diff"] < 1e-4
    assert abs(res.summary["params_after"] - res.summary["params_target"]) <= res.summary["params_tolerance"]
