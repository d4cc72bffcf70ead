"""Spec validation, JSON round trip, lean import, budget arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from lorashear.budget import ModelShape, plan_quotas
from lorashear.config import JobSpec, StructureConfig, load_spec_file
from lorashear.errors import ConfigError, TargetNotExpressibleError, UnsupportedModelError
from lorashear.preflight import preflight
from lorashear.resolve import Roots


def test_json_round_trip_is_identity() -> None:
    spec = JobSpec.from_dict(
        {
            "model": "stories260K",
            "target_ratio": 0.3,
            "lora": {"rank": 4, "target_modules": ["q_proj"]},
            "lhspg": {"mode": "hsp"},
            "data": {"instruct": []},
        }
    )
    again = JobSpec.from_json(spec.to_json())
    assert again == spec
    assert json.loads(again.to_json()) == json.loads(spec.to_json())


def test_unknown_key_warns_and_is_ignored() -> None:
    with pytest.warns(UserWarning, match="lhspg.bogus"):
        spec = JobSpec.from_dict({"model": "m", "lhspg": {"bogus": 1}})
    assert "bogus" not in spec.to_json()


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({}, "model"),
        ({"model": "../etc/passwd"}, "model"),
        ({"model": "/abs/path"}, "model"),
        ({"model": "m", "target_ratio": 1.5}, "target_ratio"),
        ({"model": "m", "target_ratio": "0.2"}, "target_ratio"),
        ({"model": "m", "lora": {"rank": 0}}, "lora.rank"),
        ({"model": "m", "lora": {"target_modules": ["lm_head"]}}, "lora.target_modules[0]"),
        ({"model": "m", "lhspg": {"mode": "magic"}}, "lhspg.mode"),
        ({"model": "m", "lhspg": {"epsilon": 0.95}}, "lhspg.epsilon"),
        ({"model": "m", "runtime": {"device": "cpu", "dtype": "float16"}}, "runtime.dtype"),
        ({"model": "m", "data": {"eval": "tinystories/train_dialogue.txt"}}, "data.eval"),
        (
            {"model": "m", "data": {"train": [{"name": "a", "train": "x.txt", "validation_fraction": 2}]}},
            "data.train[0].validation_fraction",
        ),
        ({"model": "m", "structures": {"attention": False, "mlp": False}}, "structures"),
        ({"model": "m", "version": 9}, "version"),
        ({"model": "m", "lora": {"rank": 10**9}}, "lora.rank"),
        ({"model": "x" * 300}, "model"),
        ({"model": "m", "lhspg": {"warmup_steps": 10**20}}, "lhspg.warmup_steps"),
        ({"model": "m", "lhspg": {"periods": 10_000, "period_steps": 10_000}}, "lhspg.period_steps"),
        ({"model": "m", "analysis": {"probe": "random"}}, "analysis.probe"),
        ({"model": "m", "lhspg": {"instruct_share": 1.5}}, "lhspg.instruct_share"),
        ({"model": "m", "lhspg": {"instruct_share": 0.5}, "data": {"instruct": []}}, "lhspg.instruct_share"),
        ({"model": "m", "lora": {"train_norms": 1}}, "lora.train_norms"),
        ({"model": "m", "data": {"calibration_source": "c4"}}, "data.calibration_source"),
        ({"model": "m", "lhspg": {"importance_data": "eval"}}, "lhspg.importance_data"),
        (
            {"model": "m", "lhspg": {"importance_data": "calibration", "importance": "lora_saliency"}},
            "lhspg.importance_data",
        ),
        ({"model": "m", "data": {"prompt_template": "vicuna"}}, "data.prompt_template"),
        ({"model": "m", "data": {"prompt_template": "Q: {instruction} {output}"}}, "data.prompt_template"),
        ({"model": "m", "data": {"prompt_template": "Q: {instruction.__class__}"}}, "data.prompt_template"),
        ({"model": "m", "data": {"prompt_template": "Q: {instruction"}}, "data.prompt_template"),
        ({"model": "m", "data": {"prompt_template": ""}}, "data.prompt_template"),
        ({"model": "m", "data": {"prompt_template": "{instruction:>999999999}"}}, "data.prompt_template"),
        ({"model": "m", "data": {"prompt_template": "{instruction!r}"}}, "data.prompt_template"),
        ({"model": "m", "lora": {"train_norms": True}, "structures": {"hidden": True}}, "lora.train_norms"),
        ({"model": "m", "recovery": {"ema": 1.0}}, "recovery.ema"),
        ({"model": "m", "recovery": {"ema": -0.1}}, "recovery.ema"),
        ({"model": "m", "recovery": {"ema": True}}, "recovery.ema"),
        ({"model": "m", "recovery": {"reconstruct": "yes"}}, "recovery.reconstruct"),
        ({"model": "m", "recovery": {"reconstruct_tokens": 64}}, "recovery.reconstruct_tokens"),
        ({"model": "m", "recovery": {"reconstruct_ridge": 0}}, "recovery.reconstruct_ridge"),
        ({"model": "m", "recovery": {"reconstruct_target": "logits"}}, "recovery.reconstruct_target"),
        ({"model": "m", "recovery": {"reconstruct": True}, "structures": {"hidden": True}}, "recovery.reconstruct"),
    ],
)
def test_bad_specs_name_the_field(spec: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        JobSpec.from_dict(spec)
    assert info.value.field == field
    assert field.split(".")[-1].split("[")[0] in str(info.value)


def test_yaml_spec(tmp_path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text("model: stories260K\ntarget_ratio: 0.25\nlora:\n  rank: 4\n")
    spec = load_spec_file(str(p))
    assert spec.target_ratio == 0.25 and spec.lora.rank == 4


def test_llama7b_parameter_arithmetic() -> None:
    """ALGORITHM.md: 25% of heads and channels in layers 4-29 leaves 5,422,977,024 of 6,738,415,616."""
    s = ModelShape("llama", 32, 4096, 32, 32, 128, 11008, 32000, False, False, False, False)
    assert s.total_params == 6_738_415_616
    per_layer_removed = (s.param_count(32, 1, 11008, 4096) - s.param_count(24, 1, 8256, 4096)) // s.num_layers
    assert s.total_params - 26 * per_layer_removed == 5_422_977_024


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3, 0.5])
def test_quotas_hit_target_within_one_step(ratio: float) -> None:
    s = ModelShape.from_config(json.loads((Roots().model_root / "stories260K" / "config.json").read_text()))
    q = plan_quotas(s, ratio, StructureConfig(), 0.1)
    assert abs(q.params_after - q.params_target) <= q.tolerance
    assert q.kept["num_attention_heads"] % q.kept["num_key_value_heads"] == 0


def test_gqa_kv_groups_only_moves_in_thirds() -> None:
    """A 3-KV-head model pruned only in whole KV groups loses attention in 33% steps; query heads fill in."""
    s = ModelShape("llama", 30, 576, 9, 3, 64, 1536, 49152, True, False, False, False)
    kv_only = plan_quotas(s, 0.2, StructureConfig(attention_unit="kv_group"), 0.1)
    assert kv_only.query_heads_per_group == 0
    auto = plan_quotas(s, 0.2, StructureConfig(attention_unit="auto"), 0.1)
    assert auto.kept["num_attention_heads"] % auto.kept["num_key_value_heads"] == 0
    with pytest.raises(TargetNotExpressibleError) as info:
        plan_quotas(s, 0.85, StructureConfig(), 0.5)
    assert info.value.field == "target_ratio"


def test_llama_with_bias_keeps_heads_dividing_hidden() -> None:
    s = ModelShape("llama", 2, 32, 4, 2, 8, 48, 512, True, True, True, True)
    q = plan_quotas(s, 0.3, StructureConfig(), 0.1)
    assert 32 % q.kept["num_attention_heads"] == 0


def test_preflight_rejects_bad_names_and_models(tmp_path) -> None:
    roots = Roots()
    assert preflight(JobSpec.from_dict({"model": "stories260K"}), roots).quotas.params_before == 260_032
    with pytest.raises(ConfigError, match="no model named"):
        preflight(JobSpec.from_dict({"model": "nope"}), roots)
    bad = tmp_path / "models" / "gpt"
    bad.mkdir(parents=True)
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        preflight(JobSpec.from_dict({"model": "gpt"}), Roots(tmp_path / "models", roots.data_root))
    (tmp_path / "models" / "escape").symlink_to("/etc")
    with pytest.raises(ConfigError, match="outside"):
        preflight(JobSpec.from_dict({"model": "escape"}), Roots(tmp_path / "models", roots.data_root))


def test_preflight_bounds_lora_rank_by_the_model() -> None:
    with pytest.raises(ConfigError) as info:
        preflight(JobSpec.from_dict({"model": "stories260K", "lora": {"rank": 65}}), Roots())
    assert info.value.field == "lora.rank"


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "stories260K", "--data", "x.txt", "--window", "-5"],
        ["eval", "stories260K", "--data", "x.txt", "--device", "banana"],
        ["inspect", "stories260K", "--gamma", "2"],
        ["inspect", "stories260K", "--hidden-fraction", "1.5"],
    ],
)
def test_cli_rejects_bad_arguments_without_traceback(argv: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "lorashear.cli", *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "error" in out.stderr


def test_lean_import_without_torch() -> None:
    """The API validates specs where torch cannot be imported (ARCHITECTURE.md)."""
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "peft", "safetensors"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import lorashear, lorashear.config, lorashear.preflight, lorashear.budget, lorashear.resolve, lorashear.events
        from lorashear.config import JobSpec
        from lorashear.preflight import preflight
        from lorashear.resolve import Roots
        r = preflight(JobSpec.from_dict({"model": "stories260K", "target_ratio": 0.2}), Roots())
        assert r.quotas.params_after < r.quotas.params_before
        assert "torch" not in sys.modules
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_recovery_lr_schedule_is_validated() -> None:
    with pytest.raises(ConfigError, match="recovery.lr_schedule"):
        JobSpec.from_dict({"model": "stories260K", "recovery": {"lr_schedule": "exponential"}})
    with pytest.raises(ConfigError, match="recovery.warmup_steps"):
        JobSpec.from_dict({"model": "stories260K", "recovery": {"warmup_steps": -1}})
