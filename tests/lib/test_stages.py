"""The public stage verbs one by one (issue 10), and what the pipeline must refuse to ship (issue 7, items 6-8)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorashear.errors import Cancelled, ConfigError, DivergedError
from lorashear.events import STAGES
from lorashear.pipeline import run
from lorashear.resolve import BUNDLED_DATA_ROOT, BUNDLED_MODEL_ROOT, Roots

from .test_pipeline import run_collect, same_weights, spec_of


def assert_resumes_alike(spec, tmp_path: Path, summary: dict, *, cancel_at: tuple[str, int]) -> None:
    """A run of ``spec`` cancelled at ``cancel_at`` (stage, step) resumes to the weights in ``tmp_path / "ref"``
    and to ``summary``."""
    with pytest.raises(Cancelled):
        run_collect(spec, tmp_path / "out", tmp_path / "work", cancel_at=cancel_at)
    resumed = run_collect(spec, tmp_path / "out", tmp_path / "work")
    same_weights(tmp_path / "ref", tmp_path / "out")
    assert resumed.summary == summary


def test_single_stages_from_python() -> None:
    """The README's library example: each stage alone, a config in, a typed result out."""
    import lorashear
    from lorashear.config import EvaluationConfig, LHSPGConfig

    spec = spec_of()
    job = lorashear.load(spec)  # model + fresh LoRA + tokenized data
    st = lorashear.discover(job.model, spec.structures, probe_ids=job.data.probe(8, 1))
    quotas = lorashear.plan_quotas(job.shape, 0.2, spec.structures, gamma=0.1)
    analysis = lorashear.analyze(job.model, st, job.data.calibration.windows(64)[:8], spec.analysis)
    assert len(analysis.layer_map) == 2 * job.shape.num_layers
    assert all(len(v) >= 1 for k, v in analysis.protected.items() if not k.startswith("query_head"))
    gen = torch.Generator().manual_seed(0)
    cfg = LHSPGConfig(warmup_steps=1, periods=2, period_steps=2, batch_size=2, seq_len=32)
    pruned = lorashear.prune(
        job.model, st, lorashear.set_quotas(st, quotas), cfg, lambda: job.data.pool.sample(2, 32, gen)
    )
    assert sum(len(v) for v in pruned.removed.values()) > 0 and len(pruned.losses) == cfg.total_steps
    before = lorashear.evaluate(job.model, job.data.eval, EvaluationConfig(window=64, max_windows=4))
    res = lorashear.compress(
        job.model, st, pruned.removed, probe_ids=job.data.probe(), expected_params=quotas.params_after
    )
    assert res.exact and res.max_abs_logit_diff < 1e-4 and res.params_after == quotas.params_after
    after = lorashear.evaluate(job.model, job.data.eval, EvaluationConfig(window=64, max_windows=4))
    assert after.perplexity.perplexity == pytest.approx(before.perplexity.perplexity, rel=1e-4)


def test_analysis_probe_taylor_ablates_the_lowest_knowledge_groups() -> None:
    """``analysis.probe: taylor`` (issue 9): the lowest-Taylor groups are not the lowest-magnitude ones, so the map
    differs from the magnitude probe's; the group scores, protection and dense loss do not, and the model is
    unchanged."""
    import dataclasses

    import lorashear
    from lorashear.evaluation.loss import lm_loss, window_batches
    from lorashear.importance import MagnitudeImportance, TaylorImportance

    spec = spec_of()
    job = lorashear.load(spec)
    st = lorashear.discover(job.model, spec.structures, probe_ids=job.data.probe(8, 1))
    windows = job.data.calibration.windows(64)[:8]
    state = {k: v.clone() for k, v in job.model.state_dict().items()}
    by_mag = lorashear.analyze(job.model, st, windows, dataclasses.replace(spec.analysis, probe="magnitude"))
    by_taylor = lorashear.analyze(job.model, st, windows, dataclasses.replace(spec.analysis, probe="taylor"))
    assert all(torch.equal(v, job.model.state_dict()[k]) for k, v in state.items())
    assert by_taylor.protected == by_mag.protected and by_taylor.dense_loss == pytest.approx(by_mag.dense_loss)
    assert [(r["layer"], r["node_group"]) for r in by_taylor.layer_map] == [
        (r["layer"], r["node_group"]) for r in by_mag.layer_map
    ]
    assert [r["deviation"] for r in by_taylor.layer_map] != pytest.approx([r["deviation"] for r in by_mag.layer_map])
    # the probed groups differ: on some MLP set the lowest-Taylor half is not the lowest-magnitude half
    taylor = TaylorImportance(job.model, st)
    for b in window_batches(windows, 8):
        taylor.accumulate(lambda x=b["input_ids"]: lm_loss(job.model, x))
        job.model.zero_grad(set_to_none=True)
    magnitude = MagnitudeImportance(dict(job.model.named_parameters(remove_duplicate=False)))
    mlp = [s for s in st.sets if s.kind == "mlp_channel" and s.layer is not None]
    k = mlp[0].n_groups // 2
    assert any(
        set(torch.argsort(taylor(s), stable=True)[:k].tolist())
        != set(torch.argsort(magnitude(s), stable=True)[:k].tolist())
        for s in mlp
    )


@pytest.mark.parametrize(
    "extra, field",
    [
        (
            {
                "lhspg": {"lr": 1e6, "warmup_steps": 0, "periods": 1, "period_steps": 1},
                "recovery": {"enabled": False},
            },
            "lhspg.lr",
        ),
        ({"recovery": {"lr": 1e6}}, "recovery.lr"),
    ],
    ids=["lhspg", "recovery"],
)
def test_divergence_fails_the_run_as_a_user_error(tmp_path: Path, extra: dict, field: str) -> None:
    """Issue 7, item 6: lr 1e6 once shipped an all-zero-logit model with exit 0; now a user error naming the field."""
    with pytest.raises(DivergedError) as err:
        run(spec_of(extra), tmp_path / "out", roots=Roots(), work_dir=tmp_path / "w")
    assert err.value.field == field and err.value.user_error and err.value.code == "diverged"
    assert field in err.value.message  # the hint names the learning rate
    assert not (tmp_path / "out").exists(), "nothing shipped"


@pytest.fixture(scope="module")
def fp16_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("models")
    src = BUNDLED_MODEL_ROOT / "stories260K"
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float16)
    model.save_pretrained(str(root / "stories-fp16"))
    for f in src.glob("tokenizer*"):
        shutil.copy(f, root / "stories-fp16" / f.name)
    shutil.copy(src / "special_tokens_map.json", root / "stories-fp16")
    return root


def test_fp16_input_exports_in_fp16_and_smaller(tmp_path: Path, fp16_root: Path) -> None:
    """Issue 7, item 7: an fp16 model was exported in fp32, 60% larger than its input."""
    from safetensors import safe_open

    spec = spec_of(model="stories-fp16")
    res = run(spec, tmp_path / "out", roots=Roots(fp16_root, BUNDLED_DATA_ROOT), work_dir=tmp_path / "w")
    assert res.report["export"]["dtype"] == "float16"
    assert set(res.report["timings"]) == set(STAGES)  # every stage, export included (issue 10)
    with safe_open(str(tmp_path / "out" / "model" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # noqa: SIM118
    assert res.report["model"]["pruned_file_bytes"] < res.report["model"]["dense_file_bytes"]


def test_export_not_smaller_than_input_fails(tmp_path: Path, fp16_root: Path) -> None:
    spec = spec_of({"export": {"dtype": "float32"}}, model="stories-fp16", target_ratio=0.1)
    with pytest.raises(ConfigError, match="not less than the input") as err:
        run(spec, tmp_path / "out", roots=Roots(fp16_root, BUNDLED_DATA_ROOT), work_dir=tmp_path / "w")
    assert err.value.field == "export.dtype"
    assert not (tmp_path / "out").exists()


def test_separate_adapter_names_its_pruned_base_relatively(tmp_path: Path) -> None:
    """Issue 7, item 8: the adapter named the dense model's absolute server path and failed to load."""
    from peft import AutoPeftModelForCausalLM

    res = run(spec_of({"export": {"merge_lora": False}}), tmp_path / "out", roots=Roots(), work_dir=tmp_path / "w")
    cfg = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "model"
    assert str(BUNDLED_MODEL_ROOT) not in (tmp_path / "out" / "adapter" / "adapter_config.json").read_text()
    cwd = os.getcwd()
    os.chdir(tmp_path / "out")
    try:
        model = AutoPeftModelForCausalLM.from_pretrained("adapter")
    finally:
        os.chdir(cwd)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) == res.summary["params_after"]


def test_cli_lists_the_service_commands_from_the_entry_point() -> None:
    """Issue 10: the library's CLI does not import the service; the service adds `serve` and `demo` itself."""
    code = (
        "import sys, lorashear.cli as c; p = c.build_parser(); "
        "assert 'api.app' not in sys.modules and 'fastapi' not in sys.modules, sorted(sys.modules); "
        "print(' '.join(sorted(p._subparsers._group_actions[0].choices)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert set(out.stdout.split()) == {"run", "inspect", "eval", "spec", "jobs", "serve", "demo"}
    source = (Path(__file__).parents[2] / "lorashear" / "cli.py").read_text()
    assert "api." not in source and "import api" not in source


def test_cli_skips_a_plugin_whose_dependencies_are_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    from lorashear import cli

    class Broken:
        name = "broken"

        def load(self):
            raise ImportError("fastapi is not installed")

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [Broken()])
    parser = cli.build_parser()
    assert "serve" not in parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert parser.parse_args(["spec"]).command == "spec"


def test_cli_refuses_a_typo_in_a_spec(tmp_path: Path) -> None:
    """Issue 7, item 10: ``{"lora": {"rnk": 4}}`` ran a job with the default rank; the CLI now refuses it."""
    spec = tmp_path / "typo.json"
    spec.write_text(json.dumps({"model": "stories260K", "lora": {"rnk": 4}}))
    cmd = [sys.executable, "-m", "lorashear.cli", "run", str(spec), "-o", str(tmp_path / "out")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "lora.rnk" in out.stderr
    assert not (tmp_path / "out").exists()


def test_distillation_from_the_dense_model_runs_and_resumes_alike(tmp_path: Path) -> None:
    """``lhspg.distill`` / ``recovery.distill`` (issue 9): a frozen dense copy is the teacher; the run is exact and
    deterministic (two runs give the same weights)."""
    spec = spec_of({"lhspg": {"distill": 0.5}, "recovery": {"distill": 0.5}})
    a = run(spec, tmp_path / "a", roots=Roots(), work_dir=tmp_path / "wa")
    b = run(spec, tmp_path / "b", roots=Roots(), work_dir=tmp_path / "wb")
    assert a.summary["max_abs_logit_diff"] < 1e-4 and a.summary == b.summary
    assert a.report["memory_estimate_bytes"] > 4 * a.summary["params_before"] * 2  # the teacher's weights counted


def test_recovery_lr_schedule_decays_and_resumes_alike(tmp_path: Path) -> None:
    """``recovery.lr_schedule`` / ``warmup_steps`` (issue 9): one schedule over both stages, reported per step as
    ``recovery/lr``; stateless, so a run cancelled inside recovery resumes to the same weights."""

    spec = spec_of({"recovery": {"lr_schedule": "cosine", "warmup_steps": 1, "lr": 1e-3}})
    lrs: list[float] = []

    def on_event(e) -> None:
        if e.stage == "recover" and e.kind == "progress":
            lrs.append(e.metrics["recovery/lr"])

    ref = run(spec, tmp_path / "ref", roots=Roots(), work_dir=tmp_path / "wref", on_event=on_event)
    assert len(lrs) == 6  # stage 1 and stage 2, 3 steps each
    assert lrs[0] == pytest.approx(0.5e-3)  # warm-up step 1 of 1
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:], strict=False))  # cosine decay after the warm-up
    assert 0 < lrs[-1] < 0.1e-3
    assert_resumes_alike(spec, tmp_path, ref.summary, cancel_at=("recover", 4))


def test_lhspg_instruct_share_changes_the_pruning_and_resumes_alike(tmp_path: Path) -> None:
    """``lhspg.instruct_share`` (issue 9): LHSPG trains, and accumulates Taylor importance, on instruction records
    too; the run stays exact, differs from the plain-pool run, and a run cancelled inside LHSPG resumes to the same
    weights (the batch source draws from the checkpointed generator)."""

    spec = spec_of({"lhspg": {"instruct_share": 0.5}})
    ref = run(spec, tmp_path / "ref", roots=Roots(), work_dir=tmp_path / "wref")
    plain = run(spec_of(), tmp_path / "plain", roots=Roots(), work_dir=tmp_path / "wplain")
    assert ref.summary["max_abs_logit_diff"] < 1e-4
    assert ref.summary["ppl_pruned"] != plain.summary["ppl_pruned"]
    assert_resumes_alike(spec, tmp_path, ref.summary, cancel_at=("prune", 5))


def test_lora_train_norms_tunes_the_norms_exports_them_and_resumes_alike(tmp_path: Path) -> None:
    """``lora.train_norms`` (issue 9): the RMSNorm weights train beside the LoRA (and only they among the base
    weights: a LoRA-only run leaves every norm as it was); the export carries them, also as ``model/`` + adapter
    (the export's reload check compares that pair with the pipeline's logits), and a run cancelled inside
    recovery, where the optimizer holds two parameter groups, resumes to the same weights."""
    from safetensors.torch import load_file

    from lorashear.training import norm_parameter_names

    dense = load_file(str(BUNDLED_MODEL_ROOT / "stories260K" / "model.safetensors"))
    norms = [k for k in dense if k.endswith("norm.weight")]
    assert len(norms) == 2 * 5 + 1  # stories260K: 5 decoder layers

    spec = spec_of({"lora": {"train_norms": True}})
    ref = run(spec, tmp_path / "ref", roots=Roots(), work_dir=tmp_path / "wref")
    plain = run(spec_of(), tmp_path / "plain", roots=Roots(), work_dir=tmp_path / "wplain")
    tuned = load_file(str(tmp_path / "ref" / "model" / "model.safetensors"))
    untouched = load_file(str(tmp_path / "plain" / "model" / "model.safetensors"))
    assert all(torch.equal(untouched[k], dense[k]) for k in norms)
    assert all(not torch.equal(tuned[k], dense[k]) for k in norms)
    assert ref.summary["max_abs_logit_diff"] < 1e-4 and ref.summary["ppl_recovered"] != plain.summary["ppl_recovered"]

    split = spec_of({"lora": {"train_norms": True}, "export": {"merge_lora": False}})
    run(split, tmp_path / "split", roots=Roots(), work_dir=tmp_path / "wsplit")
    base = load_file(str(tmp_path / "split" / "model" / "model.safetensors"))
    assert all(torch.allclose(base[k], tuned[k], atol=1e-6) for k in norms)  # the tuned norms sit in the base

    assert_resumes_alike(spec, tmp_path, ref.summary, cancel_at=("recover", 4))

    import lorashear

    job = lorashear.load(spec)
    trainable = {n for n, p in job.model.named_parameters() if p.requires_grad}
    assert set(norm_parameter_names(job.model)) <= trainable
    assert all(".lora_" in n or n in norm_parameter_names(job.model) for n in trainable)


def test_recovery_ema_ends_on_the_average_of_the_trajectory_and_resumes_alike(tmp_path: Path) -> None:
    """``recovery.ema`` (issue 9): after every optimizer step the average moves ``1 - ema`` of the way to the live
    LoRA weights, starting from the weights recovery starts with; when recovery ends the average replaces them.
    A run cancelled inside recovery resumes to the same weights (the average is in the checkpoint)."""
    import lorashear
    from lorashear.config import RecoveryConfig
    from lorashear.events import Hooks

    job = lorashear.load(spec_of())
    params = [p for p in job.model.parameters() if p.requires_grad]
    expected = [p.detach().clone() for p in params]
    live: list[torch.Tensor] = []

    def on_event(e) -> None:
        if e.stage == "recover" and e.kind == "progress":
            live[:] = [p.detach().clone() for p in params]
            for a, p in zip(expected, params, strict=True):
                a.mul_(0.75).add_(p.detach(), alpha=0.25)

    cfg = RecoveryConfig(rounds=1, steps_per_round=4, batch_size=2, seq_len=32, eval_batches=1, ema=0.75)
    stages = lorashear.recovery_stages(job.data.train, job.data.instruct, cfg)
    refs = {d.name: 1.0 for s in stages for d in s.datasets}
    lorashear.recover(job.model, stages, refs, cfg, torch.Generator().manual_seed(0), hooks=Hooks(on_event=on_event))
    assert any(not torch.equal(a, w) for a, w in zip(expected, live, strict=True))  # the average is not the last step
    for a, p in zip(expected, params, strict=True):
        torch.testing.assert_close(p.detach(), a, rtol=0, atol=1e-7)

    spec = spec_of({"recovery": {"ema": 0.5}})
    ref = run(spec, tmp_path / "ref", roots=Roots(), work_dir=tmp_path / "wref")
    plain = run(spec_of(), tmp_path / "plain", roots=Roots(), work_dir=tmp_path / "wplain")
    assert ref.summary["max_abs_logit_diff"] < 1e-4
    assert ref.summary["ppl_recovered"] != plain.summary["ppl_recovered"]
    assert ref.summary["ppl_pruned"] == plain.summary["ppl_pruned"]  # only recovery changes
    assert_resumes_alike(spec, tmp_path, ref.summary, cancel_at=("recover", 4))


def _pruned_job(spec):
    """A job of ``spec`` pruned one-shot (Taylor) and sliced: ``(job, structures)``."""
    import lorashear
    from lorashear.baselines import one_shot
    from lorashear.evaluation.loss import window_batches

    job = lorashear.load(spec)
    st = lorashear.discover(job.model, spec.structures, probe_ids=job.data.probe(8, 1))
    quotas = lorashear.plan_quotas(job.shape, spec.target_ratio, spec.structures, gamma=0.0)
    windows = job.data.calibration.windows(64)[:8]
    removed = one_shot(job.model, st, lorashear.set_quotas(st, quotas), "taylor", window_batches(windows, 4))
    lorashear.compress(job.model, st, removed, probe_ids=job.data.probe(), expected_params=quotas.params_after)
    return job, st


def test_reconstruct_solves_the_ridge_least_squares_of_each_output_projection() -> None:
    """``recovery.reconstruct`` (issue 9): every ``o_proj`` / ``down_proj`` of the sliced model ends on the ridge
    solution ``(X^T X + lam I)^-1 (X^T Y + lam W_old^T)`` with ``X`` its inputs in the refitted model (measured
    here through whole-model forward passes, not the layer-by-layer path the refit takes) and ``Y`` the dense
    module's outputs; only those base weights change (the LoRA keeps what it learned), every module's error
    falls, and the model's loss on the calibration text moves towards the dense model's."""
    import copy

    from lorashear.evaluation.loss import mean_loss, window_batches
    from lorashear.modeling import base_name
    from lorashear.recovery import reconstruct
    from lorashear.recovery.reconstruct import _effective_weight, _find

    spec = spec_of({"recovery": {"reconstruct": True}}, target_ratio=0.5)
    job, st = _pruned_job(spec)
    assert job.teacher is not None
    with torch.no_grad():  # a trained-looking LoRA, so the refit must subtract it from the base weight
        for n, p in job.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    old = copy.deepcopy(job.model)
    windows = job.data.pool.sample(16, 64, torch.Generator().manual_seed(0))["input_ids"]
    batches = window_batches(list(windows[:8]), 8)
    loss_before = mean_loss(job.model, batches)
    res = reconstruct(job.model, job.teacher, st, windows, ridge=0.05, batch_size=4)

    assert len(res.modules) == 2 * job.shape.num_layers and res.tokens == windows.numel()
    assert all(a < b for a, b in zip(res.error_after, res.error_before, strict=True))
    changed = {
        base_name(n)
        for (n, p), q in zip(job.model.named_parameters(), old.parameters(), strict=True)
        if not torch.equal(p, q)
    }
    assert changed == {f"{m}.weight" for m in res.modules}
    dense_loss = mean_loss(job.teacher, batches)
    assert abs(mean_loss(job.model, batches) - dense_loss) < abs(loss_before - dense_loss)

    job.model.eval()
    got: dict[str, torch.Tensor] = {}
    for name in (res.modules[0], res.modules[-3]):
        module, dense = _find(job.model, name), _find(job.teacher, name)
        hx = module.register_forward_hook(lambda _m, a, _o: got.__setitem__("x", a[0].reshape(-1, a[0].shape[-1])))
        hy = dense.register_forward_hook(lambda _m, _a, o: got.__setitem__("y", o.reshape(-1, o.shape[-1])))
        with torch.no_grad():
            job.model(input_ids=windows, use_cache=False)
            job.teacher(input_ids=windows, use_cache=False)
        hx.remove()
        hy.remove()
        x, y = got["x"].double(), got["y"].double()
        w_old = _effective_weight(_find(old, name))[0]
        gram = x.T @ x
        lam = 0.05 * float(gram.diagonal().mean())
        want = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), x.T @ y + lam * w_old.T).T
        torch.testing.assert_close(_effective_weight(module)[0], want, rtol=1e-4, atol=1e-5)


def test_recovery_reconstruct_in_a_job_is_reported_and_resumes_alike(tmp_path: Path) -> None:
    """A job with ``recovery.reconstruct`` stays exact, reports the refit (errors fall), changes only what comes
    after slicing, and a run cancelled inside the fine-tuning resumes to the same weights (the refit is not redone
    on refitted weights)."""

    spec = spec_of({"recovery": {"reconstruct": True, "reconstruct_tokens": 512}})
    ref = run(spec, tmp_path / "ref", roots=Roots(), work_dir=tmp_path / "wref")
    plain = run(spec_of(), tmp_path / "plain", roots=Roots(), work_dir=tmp_path / "wplain")
    assert ref.summary["max_abs_logit_diff"] < 1e-4
    rec = ref.report["reconstruction"]
    assert rec["modules"] == 2 * 5 and rec["tokens"] == 512  # stories260K: 5 layers, windows of seq_len 64
    assert rec["mean_error_after"] < rec["mean_error_before"]
    assert plain.report["reconstruction"] is None
    assert ref.summary["ppl_pruned"] == plain.summary["ppl_pruned"]  # measured before the refit
    assert ref.summary["ppl_recovered"] != plain.summary["ppl_recovered"]
    assert_resumes_alike(spec, tmp_path, ref.summary, cancel_at=("recover", 2))


def test_reconstruct_stream_target_also_cancels_the_residual_gap() -> None:
    """``recovery.reconstruct_target: stream``: layer 0's ``o_proj`` sees no gap yet (both streams start at the
    same embeddings) and gets the block target's solution; layer 0's ``down_proj`` is fitted to its dense output
    plus the gap the refitted ``o_proj`` left in the residual stream, ``(h + o)_dense - (h + o)_pruned``."""
    import copy

    from lorashear.recovery import reconstruct
    from lorashear.recovery.reconstruct import _effective_weight, _find

    spec = spec_of({"recovery": {"reconstruct": True}}, target_ratio=0.5)
    job, st = _pruned_job(spec)
    sliced, block = copy.deepcopy(job.model), copy.deepcopy(job.model)
    windows = job.data.pool.sample(8, 64, torch.Generator().manual_seed(0))["input_ids"]
    res = reconstruct(job.model, job.teacher, st, windows, ridge=0.05, target="stream", batch_size=4)
    reconstruct(block, job.teacher, st, windows, ridge=0.05, target="block", batch_size=4)
    o_name, down_name = res.modules[:2]
    assert o_name.endswith("o_proj") and down_name.endswith("down_proj")
    w_o = _effective_weight(_find(job.model, o_name))[0]
    torch.testing.assert_close(w_o, _effective_weight(_find(block, o_name))[0])
    assert all(a < b for a, b in zip(res.error_after, res.error_before, strict=True))

    def grab(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        got: dict[str, torch.Tensor] = {}

        def keep(key: str):
            return lambda _m, a, o: got.update({f"{key}.in": a[0], f"{key}.out": o})

        hooks = [_find(model, o_name).register_forward_hook(keep("o"))]
        hooks.append(_find(model, down_name).register_forward_hook(keep("down")))
        layer0 = _find(model, o_name.rsplit(".", 2)[0])
        hooks.append(layer0.register_forward_hook(lambda _m, a, _o: got.update({"h": a[0]})))
        model.eval()
        with torch.no_grad():
            model(input_ids=windows, use_cache=False)
        for h in hooks:
            h.remove()
        return {k: v.reshape(-1, v.shape[-1]).double() for k, v in got.items()}

    s, t = grab(job.model), grab(job.teacher)
    torch.testing.assert_close(s["h"], t["h"])  # the same embeddings: no gap before layer 0
    goal = t["down.out"] + (t["h"] + t["o.out"]) - (s["h"] + s["o.out"])
    x = s["down.in"]
    gram = x.T @ x
    lam = 0.05 * float(gram.diagonal().mean())
    w_before = _effective_weight(_find(sliced, down_name))[0]
    want = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), x.T @ goal + lam * w_before.T).T
    torch.testing.assert_close(_effective_weight(_find(job.model, down_name))[0], want, rtol=1e-4, atol=1e-5)


def test_generated_calibration_is_the_models_own_seeded_text_and_leaves_the_random_state() -> None:
    """``data.calibration_source: generated`` (issue 9): one window of ``analysis.seq_len`` per window of the
    calibration file, each opening with that window's first tokens; the same seed gives the same text, another
    seed other text; the global random state after loading is what it is without the option (LoRA init and
    batches unchanged)."""
    import lorashear
    from lorashear.inputs import GENERATION_PROMPT_TOKENS, generate_calibration

    spec = spec_of({"data": {"calibration_source": "generated"}})
    text_spec = spec_of()
    seq = spec.analysis.seq_len
    job = lorashear.load(spec)
    after_generated = torch.rand(4)
    text = lorashear.load(text_spec)
    after_text = torch.rand(4)
    assert torch.equal(after_generated, after_text)
    n = len(text.data.calibration) // seq
    assert len(job.data.calibration) == n * seq
    gen, read = job.data.calibration.windows(seq), text.data.calibration.windows(seq)
    assert all(
        torch.equal(g[:GENERATION_PROMPT_TOKENS], r[:GENERATION_PROMPT_TOKENS]) for g, r in zip(gen, read, strict=True)
    )
    assert not all(torch.equal(g, r) for g, r in zip(gen, read, strict=True))
    again = generate_calibration(text.model, text.tokenizer, text.data.calibration, seq, spec.seed)
    other = generate_calibration(text.model, text.tokenizer, text.data.calibration, seq, spec.seed + 1)
    assert torch.equal(again.ids, job.data.calibration.ids)
    assert not torch.equal(other.ids, again.ids)
    vocab = text.model.get_input_embeddings().weight.shape[0]
    assert int(job.data.calibration.ids.max()) < vocab


def test_lhspg_importance_on_calibration_text_changes_the_pruning_and_resumes_alike(tmp_path: Path) -> None:
    """``lhspg.importance_data: calibration`` with generated calibration (issue 9): the Taylor importance is
    measured on the calibration windows, not the training batches, so other groups go; the run stays exact, trains
    on the same batches (the pool draws are unchanged), and a run cancelled inside LHSPG resumes to the same
    weights (the calibration batches are picked by step, not drawn)."""
    generated = {"data": {"calibration_source": "generated"}}
    spec = spec_of({**generated, "lhspg": {"importance_data": "calibration"}})
    ref = run(spec, tmp_path / "ref", roots=Roots(), work_dir=tmp_path / "wref")
    on_train = run(spec_of(generated), tmp_path / "plain", roots=Roots(), work_dir=tmp_path / "wplain")
    assert ref.summary["max_abs_logit_diff"] < 1e-4
    assert ref.summary["ppl_pruned"] != on_train.summary["ppl_pruned"]
    assert_resumes_alike(spec, tmp_path, ref.summary, cancel_at=("prune", 5))


def test_prune_refuses_calibration_importance_without_its_batches() -> None:
    import lorashear
    from lorashear.config import LHSPGConfig

    spec = spec_of()
    job = lorashear.load(spec)
    st = lorashear.discover(job.model, spec.structures, probe_ids=job.data.probe(8, 1))
    quotas = lorashear.plan_quotas(job.shape, 0.2, spec.structures, gamma=0.1)
    cfg = LHSPGConfig(
        warmup_steps=1, periods=1, period_steps=1, batch_size=2, seq_len=32, importance_data="calibration"
    )
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="importance_sample"):
        lorashear.prune(job.model, st, lorashear.set_quotas(st, quotas), cfg, lambda: job.data.pool.sample(2, 32, gen))
