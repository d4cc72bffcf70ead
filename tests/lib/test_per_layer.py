"""Per-layer layout (issue 9): the allocation from the layer map, the per-layer model classes, the export round trip.

Invariants: the per-layer plan meets the parameter target within half a channel step; more sensitive layers lose
less; gamma caps every layer; a model whose layers were sliced to different widths computes the same logits after
slicing, after re-expression as the family's per-layer class, and after ``save_pretrained`` +
``AutoModelForCausalLM.from_pretrained`` in a fresh interpreter that only imported ``lorashear`` (any import order).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorashear.budget import ModelShape, _attn_params, _mlp_params, plan_layer_quotas
from lorashear.compression import check_exact, kept_indices, slice_, stock_loadable
from lorashear.config import JobSpec, StructureConfig
from lorashear.errors import ConfigError, TargetNotExpressibleError
from lorashear.graph import discover
from lorashear.optim import set_quotas
from lorashear.per_layer import is_uniform, layer_sizes
from lorashear.pipeline import run
from lorashear.resolve import Roots

from .conftest import FAST, Case
from .test_structures import lora_model, zero_groups_

SMOL = ModelShape("llama", 30, 576, 9, 3, 64, 1536, 49152, True, False, False, False)
"""SmolLM2-135M's sizes."""


def layer_map(n_layers: int, attn: list[float], mlp: list[float], shape: ModelShape) -> list[dict]:
    rows = []
    for i in range(n_layers):
        rows.append({"layer": i, "node_group": "attention", "ablated_groups": max(1, shape.num_kv_heads // 2),
                     "deviation": attn[i]})  # fmt: skip
        rows.append({"layer": i, "node_group": "mlp", "ablated_groups": shape.intermediate_size // 2,
                     "deviation": mlp[i]})  # fmt: skip
    return rows


def params_of(shape: ModelShape, q) -> int:
    fixed = shape.total_params - shape.num_layers * (
        _attn_params(shape, shape.num_kv_heads, shape.n_rep) + _mlp_params(shape, shape.intermediate_size)
    )
    return fixed + sum(
        _attn_params(shape, shape.num_kv_heads - lq.kv_groups, shape.n_rep - lq.query_heads_per_group)
        + _mlp_params(shape, shape.intermediate_size - lq.channels)
        for lq in q.layers
    )


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.33, 0.5, 0.6])
@pytest.mark.parametrize("exponent", [0.0, 0.5, 1.0, 2.0])
def test_per_layer_plan_meets_the_target(ratio: float, exponent: float) -> None:
    gen = torch.Generator().manual_seed(int(ratio * 100 + exponent * 10))
    attn = (torch.rand(30, generator=gen) * 0.5 + 0.02).tolist()
    mlp = (torch.rand(30, generator=gen) * 0.5 + 0.02).tolist()
    mlp[0] = 5.0  # the first MLP is the most sensitive (as measured on SmolLM2 and in the paper)
    cfg = StructureConfig(layout="per_layer", sensitivity_exponent=exponent)
    q = plan_layer_quotas(SMOL, ratio, cfg, 0.1, layer_map(30, attn, mlp, SMOL))
    assert len(q.layers) == 30
    assert params_of(SMOL, q) == q.params_after
    assert abs(q.params_after - q.params_target) <= q.tolerance == 3 * 576 // 2
    for lq in q.layers:  # gamma = 0.1 keeps at least one KV group, one query head per group, 10% of the channels
        assert 0 <= lq.kv_groups <= 2 and 0 <= lq.query_heads_per_group <= 2
        assert 0 <= lq.channels <= 1536 - 154
    if exponent > 0:
        assert q.layers[0].channels == min(lq.channels for lq in q.layers)  # the sensitive MLP loses least
    if exponent == 0:  # every layer loses the same fraction: channels differ by rounding only
        assert max(lq.channels for lq in q.layers) - min(lq.channels for lq in q.layers) <= 2


@pytest.mark.parametrize("share", [0.1, 0.25, 0.3])
def test_per_layer_plan_honours_attention_share(share: float) -> None:
    """``structures.attention_share`` in the per-layer layout (issue 9): attention gives that fraction of the
    removed parameters (within the rounding to whole heads), the layer map still orders the layers."""
    gen = torch.Generator().manual_seed(7)
    attn = (torch.rand(30, generator=gen) * 0.5 + 0.02).tolist()
    mlp = (torch.rand(30, generator=gen) * 0.5 + 0.02).tolist()
    cfg = StructureConfig(layout="per_layer", attention_share=share)
    q = plan_layer_quotas(SMOL, 0.5, cfg, 0.1, layer_map(30, attn, mlp, SMOL))
    assert abs(q.params_after - q.params_target) <= q.tolerance
    full = _attn_params(SMOL, SMOL.num_kv_heads, SMOL.n_rep)
    attn_removed = sum(
        full - _attn_params(SMOL, SMOL.num_kv_heads - lq.kv_groups, SMOL.n_rep - lq.query_heads_per_group)
        for lq in q.layers
    )
    head = full // 9  # one query head and its share of a KV group: the rounding step
    removed = q.params_before - q.params_after
    assert abs(attn_removed - share * removed) < 2 * head
    least = min(range(30), key=lambda i: attn[i])
    most = max(range(30), key=lambda i: attn[i])
    kept = q.kept["num_attention_heads"]
    assert kept[most] >= kept[least]  # the most sensitive attention keeps at least as many heads
    with pytest.raises(TargetNotExpressibleError) as info:  # attention cannot give 90% of a 50% cut
        plan_layer_quotas(SMOL, 0.5, StructureConfig(layout="per_layer", attention_share=0.9), 0.1,
                          layer_map(30, attn, mlp, SMOL))  # fmt: skip
    assert info.value.field == "structures.attention_share"


def test_per_layer_plan_follows_sensitivity() -> None:
    dev = [0.1 + 0.1 * i for i in range(30)]  # later layers more sensitive
    q = plan_layer_quotas(SMOL, 0.3, StructureConfig(layout="per_layer"), 0.1, layer_map(30, dev, dev, SMOL))
    channels = [lq.channels for lq in q.layers]
    assert all(a >= b for a, b in zip(channels, channels[1:], strict=False))
    assert channels[0] > channels[-1]
    heads = q.kept["num_attention_heads"]
    assert heads[0] <= heads[-1]


@pytest.mark.parametrize(("fraction", "kept"), [(0.0, 576), (0.11, 512), (0.2, 464)])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_per_layer_plan_with_hidden_fraction(fraction: float, kept: int, ratio: float) -> None:
    """The hidden width loses its fixed fraction (rounded to 8); heads and channels, counted at the narrower width,
    give the rest of the budget."""
    import dataclasses

    gen = torch.Generator().manual_seed(7)
    attn = (torch.rand(30, generator=gen) * 0.5 + 0.02).tolist()
    mlp = (torch.rand(30, generator=gen) * 0.5 + 0.02).tolist()
    rows = layer_map(30, attn, mlp, SMOL)
    cfg = StructureConfig(layout="per_layer", hidden=True, hidden_fraction=fraction)
    q = plan_layer_quotas(SMOL, ratio, cfg, 0.1, rows)
    narrow = dataclasses.replace(SMOL, hidden_size=kept)
    assert q.hidden == 576 - kept and q.kept["hidden_size"] == kept
    assert q.params_before == SMOL.total_params
    assert params_of(narrow, q) == q.params_after
    assert abs(q.params_after - q.params_target) <= q.tolerance == 3 * kept // 2
    assert abs(q.params_target - (1 - ratio) * SMOL.total_params) <= 1
    plain = plan_layer_quotas(SMOL, ratio, StructureConfig(layout="per_layer"), 0.1, rows)
    if kept < 576:  # the narrower hidden width leaves more heads and channels in the layers
        assert sum(q.kept["intermediate_size"]) + 200 * sum(q.kept["num_attention_heads"]) > sum(
            plain.kept["intermediate_size"]
        ) + 200 * sum(plain.kept["num_attention_heads"])
    else:
        assert q.layers == plain.layers


def test_per_layer_plan_refuses_a_hidden_fraction_beyond_the_target() -> None:
    rows = layer_map(30, [0.1] * 30, [0.1] * 30, SMOL)
    cfg = StructureConfig(layout="per_layer", hidden=True, hidden_fraction=0.5)
    with pytest.raises(TargetNotExpressibleError, match="hidden_fraction=0.5 alone removes") as err:
        plan_layer_quotas(SMOL, 0.2, cfg, 0.1, rows)
    assert err.value.field == "structures.hidden_fraction"
    from lorashear.budget import plan_quotas  # the pre-flight's check, before a job is queued

    with pytest.raises(TargetNotExpressibleError, match="hidden_fraction=0.5 alone removes") as err:
        plan_quotas(SMOL, 0.2, cfg, 0.1)
    assert err.value.field == "structures.hidden_fraction"


def test_uniform_plan_honours_a_hidden_fraction() -> None:
    from lorashear.budget import plan_quotas

    q = plan_quotas(SMOL, 0.5, StructureConfig(hidden=True, hidden_fraction=0.11), 0.1)
    assert q.hidden == 64 and q.kept["hidden_size"] == 512
    assert abs(q.params_after - q.params_target) <= q.tolerance


def test_per_layer_plan_rejects_what_gamma_forbids() -> None:
    rows = layer_map(30, [0.1] * 30, [0.1] * 30, SMOL)
    with pytest.raises(TargetNotExpressibleError, match="per-layer"):
        plan_layer_quotas(SMOL, 0.85, StructureConfig(layout="per_layer"), 0.5, rows)


def test_per_layer_spec_validation() -> None:
    with pytest.raises(ConfigError, match="structures.layout"):
        StructureConfig(layout="ragged")
    with pytest.raises(ConfigError, match="structures.hidden_fraction"):
        StructureConfig(layout="per_layer", hidden=True)  # the hidden dimension is model-wide: give its share
    with pytest.raises(ConfigError, match="structures.hidden_fraction: needs hidden"):
        StructureConfig(layout="per_layer", hidden_fraction=0.1)
    for bad in (1.0, -0.1, "0.1", True, float("nan")):
        with pytest.raises(ConfigError, match="structures.hidden_fraction"):
            StructureConfig(layout="per_layer", hidden=True, hidden_fraction=bad)
    StructureConfig(layout="per_layer", hidden=True, hidden_fraction=0.1)
    with pytest.raises(ConfigError, match="structures.sensitivity_exponent"):
        StructureConfig(layout="per_layer", sensitivity_exponent=-1)


def ragged_removal(st, case: Case) -> dict[str, list[int]]:
    """Layer 0 loses one KV group and 20 channels, layer 1 nothing of attention and 4 channels."""
    removed: dict[str, list[int]] = {}
    for s in st.sets:
        if s.kind in ("kv_group", "attention_head") and s.layer == 0:
            removed[s.key] = [1]
        elif s.kind == "mlp_channel":
            removed[s.key] = list(range(0, 40, 2)) if s.layer == 0 else [3, 7, 11, 15]
    return removed


def test_ragged_model_slices_exactly_and_round_trips(case: Case, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = lora_model(case)
    st = discover(model)
    removed = ragged_removal(st, case)
    zero_groups_(model, st, removed)
    x = torch.randint(3, 512, (2, 12))
    with torch.no_grad():
        sparse = model(input_ids=x).logits
    slice_(model, kept_indices(st, removed))
    with torch.no_grad():
        sliced = model(input_ids=x).logits
    assert check_exact(sparse, sliced, tol=1e-4, what=case.id) <= 1e-4
    sizes = layer_sizes(model)
    assert sizes["intermediate_size"] == [28, 44] and not is_uniform(model)
    assert sizes["num_key_value_heads"] == [case.kv_heads - 1, case.kv_heads]

    merged, note = stock_loadable(model.merge_and_unload())
    assert note is not None and "per-layer" in note
    assert type(merged).__name__ == f"LoRAShear{type(merged).__mro__[1].__name__}"
    merged.save_pretrained(str(tmp_path / "m"))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == f"lorashear_{case.model_type}"
    assert cfg["layer_intermediate_size"] == [28, 44]
    loaded, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        again = loaded.eval()(input_ids=x, use_cache=False).logits
    assert (again - sparse).abs().max() < 1e-4
    out = loaded.generate(input_ids=x[:1, :4], max_new_tokens=5, do_sample=False, use_cache=True)
    assert out.shape == (1, 9)  # the KV cache sizes itself per layer


LOAD = """
import sys
order, path = sys.argv[1], sys.argv[2]
if order == "lorashear_first":
    import lorashear
    assert "torch" not in sys.modules and "transformers" not in sys.modules  # the import stays cheap
    from transformers import AutoModelForCausalLM
elif order == "transformers_first":
    from transformers import AutoModelForCausalLM
    import lorashear
else:  # a model module before the auto classes
    import lorashear
    from transformers import LlamaForCausalLM  # noqa: F401
    from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(path)
print(type(m).__name__, sum(p.numel() for p in m.parameters()))
"""


@pytest.mark.slow
def test_per_layer_job_exports_a_model_auto_classes_load(tmp_path: Path) -> None:
    d = copy.deepcopy({"model": "stories260K", "target_ratio": 0.3, **FAST})
    d["structures"] = {"layout": "per_layer"}
    d["export"] = {"save_adapter": True}
    out = tmp_path / "out"
    res = run(JobSpec.from_dict(d), out, roots=Roots())
    report = res.report
    layers = report["quotas"]["layers"]
    assert len(layers) == 5
    kept = report["quotas"]["kept"]
    assert len(set(kept["intermediate_size"])) > 1  # the layer map made the widths differ
    assert res.summary["params_after"] == report["quotas"]["params_after"]
    assert abs(report["quotas"]["params_after"] - report["quotas"]["params_target"]) <= report["quotas"]["tolerance"]
    assert report["compression"]["exact"]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["config"]["layer_intermediate_size"] == kept["intermediate_size"]
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["model_type"] == "lorashear_llama"
    assert cfg["layer_num_attention_heads"] == kept["num_attention_heads"]
    for order in ("lorashear_first", "transformers_first", "model_module_first"):
        proc = subprocess.run(
            [sys.executable, "-c", LOAD, order, str(out / "model")], capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        name, params = proc.stdout.split()[-2:]
        assert name == "LoRAShearLlamaForCausalLM" and int(params) == res.summary["params_after"]
    # the pruned base plus the adapter loads through PEFT as well
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(out / "pruned_base"))
    assert type(PeftModel.from_pretrained(base, str(out / "adapter")).get_base_model()).__name__.startswith("LoRAShear")


@pytest.mark.slow
def test_per_layer_job_with_hidden_pruning_exports_a_model_auto_classes_load(tmp_path: Path) -> None:
    """Per-layer heads and channels plus a fixed hidden share: the export is narrower everywhere, slicing is exact
    (RMSNorm's weight and epsilon rescaled, the epsilon written into the config) and it reloads through the auto
    classes."""
    d = copy.deepcopy({"model": "stories260K", "target_ratio": 0.3, **FAST})
    d["structures"] = {"layout": "per_layer", "hidden": True, "hidden_fraction": 0.125}
    out = tmp_path / "out"
    res = run(JobSpec.from_dict(d), out, roots=Roots())
    report = res.report
    kept = report["quotas"]["kept"]
    assert kept["hidden_size"] == 56 and report["quotas"]["hidden"] == 8  # stories260K: hidden 64
    assert len(set(kept["intermediate_size"])) > 1
    assert res.summary["params_after"] == report["quotas"]["params_after"]
    assert abs(report["quotas"]["params_after"] - report["quotas"]["params_target"]) <= report["quotas"]["tolerance"]
    assert report["compression"]["exact"] and report["compression"]["max_abs_logit_diff"] < 1e-4
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["model_type"] == "lorashear_llama" and cfg["hidden_size"] == 56
    assert cfg["rms_norm_eps"] == pytest.approx(1e-5 * 64 / 56)
    assert cfg["layer_intermediate_size"] == kept["intermediate_size"]
    proc = subprocess.run(
        [sys.executable, "-c", LOAD, "lorashear_first", str(out / "model")], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    name, params = proc.stdout.split()[-2:]
    assert name == "LoRAShearLlamaForCausalLM" and int(params) == res.summary["params_after"]


def test_set_quotas_per_layer_on_the_bundled_model() -> None:
    from lorashear.budget import plan_quotas
    from lorashear.modeling import load_model, model_shape

    model = load_model(Path(Roots().model_root) / "stories260K")
    shape = model_shape(model)
    st = discover(model)
    rows = layer_map(5, [0.5, 0.1, 0.1, 0.1, 0.4], [2.0, 0.1, 0.1, 0.1, 0.3], shape)
    q = plan_layer_quotas(shape, 0.3, StructureConfig(layout="per_layer"), 0.1, rows)
    quotas = set_quotas(st, q)
    for s in st.sets:
        if s.kind == "mlp_channel":
            assert quotas.get(s.key, {0: 0}) == {0: q.layers[s.layer].channels} or q.layers[s.layer].channels == 0
    uniform = set_quotas(st, plan_quotas(shape, 0.3, StructureConfig(), 0.1))
    assert quotas != uniform


def test_preflight_refuses_per_layer_for_a_family_without_a_per_layer_class(tmp_path: Path) -> None:
    import shutil

    from lorashear import _autoregister, families, per_layer
    from lorashear.errors import UnsupportedModelError
    from lorashear.families import Family, register_family
    from lorashear.preflight import preflight
    from lorashear.resolve import BUNDLED_DATA_ROOT, BUNDLED_MODEL_ROOT

    assert set(_autoregister.FAMILIES) == set(per_layer._FAMILIES)  # one list of per-layer families
    shutil.copytree(BUNDLED_MODEL_ROOT / "stories260K", tmp_path / "toy")
    cfg = json.loads((tmp_path / "toy" / "config.json").read_text())
    (tmp_path / "toy" / "config.json").write_text(json.dumps(cfg | {"model_type": "toyllama"}))
    d = copy.deepcopy({"model": "toy", "target_ratio": 0.2, **FAST})
    register_family(Family("toyllama"))
    try:
        roots = Roots(tmp_path, BUNDLED_DATA_ROOT)
        preflight(JobSpec.from_dict(d), roots)  # the uniform layout is fine
        d["structures"] = {"layout": "per_layer"}
        with pytest.raises(UnsupportedModelError, match="per_layer needs a per-layer model class") as err:
            preflight(JobSpec.from_dict(d), roots)
        assert err.value.field == "structures.layout" and err.value.user_error
    finally:
        families._FAMILIES.pop("toyllama")


@pytest.mark.slow
def test_per_layer_run_cancelled_in_lhspg_resumes_to_the_same_result(tmp_path: Path) -> None:
    from lorashear.errors import Cancelled

    from .test_pipeline import checkpointed_at, run_collect, same_weights

    d = copy.deepcopy({"model": "stories260K", "target_ratio": 0.3, **FAST})
    d["structures"] = {"layout": "per_layer"}
    spec = JobSpec.from_dict(d)
    ref = run_collect(spec, tmp_path / "ref", tmp_path / "ref.work")
    with pytest.raises(Cancelled):
        run_collect(spec, tmp_path / "out", tmp_path / "work", cancel_at=("prune", 5))
    assert checkpointed_at(tmp_path / "work") == "prune"
    resumed = run_collect(spec, tmp_path / "out", tmp_path / "work")  # the per-layer quotas are re-planned
    same_weights(tmp_path / "ref", tmp_path / "out")
    assert resumed.summary == ref.summary
    assert resumed.report["quotas"] == ref.report["quotas"]
