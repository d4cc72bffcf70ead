"""Module-level tests with hand-computed expectations (issue 10): the loss evaluator and perplexity, loss masking,
mix weights, group norms and importance, gamma protection, the family registry, the sanity checks, the typed run
state and its checkpoint round trip."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lorashear.analysis import Analysis, protect
from lorashear.budget import ModelShape
from lorashear.data import TokenStream
from lorashear.errors import DivergedError, UnsupportedModelError
from lorashear.evaluation import mean_loss, perplexity, token_nll
from lorashear.events import Hooks, LoopState
from lorashear.families import Family, get_family, register_family, supported_model_types
from lorashear.graph import SliceSpec, Structures, StructureSet
from lorashear.importance import (
    LoraRef,
    MagnitudeImportance,
    TaylorImportance,
    group_sq_norms,
    lora_group_stats,
    lora_saliency_terms,
    weighted_sum,
)
from lorashear.recovery import mix_weights
from lorashear.training import check_sane

from .conftest import CASES, build_model


class FixedLogits(nn.Module):
    """A 'causal LM' whose logits at every position are one fixed vector (ignores the input)."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(logits))

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False, **_: object) -> SimpleNamespace:
        b, t = input_ids.shape
        return SimpleNamespace(logits=self.w.expand(b, t, -1))


# loss evaluator and perplexity ------------------------------------------------------------------------------------
def test_token_nll_by_hand() -> None:
    model = FixedLogits([0.0, math.log(3.0)])  # p(0) = 1/4, p(1) = 3/4 at every position
    x = torch.tensor([[0, 1, 0, 1]])
    nll, n = token_nll(model, {"input_ids": x})
    # targets are positions 1..3: tokens 1, 0, 1
    assert n == 3
    assert nll == pytest.approx(-(2 * math.log(0.75) + math.log(0.25)))


def test_loss_masking_skips_minus_100() -> None:
    model = FixedLogits([0.0, math.log(3.0)])
    x = torch.tensor([[0, 1, 0, 1], [1, 1, 1, 1]])
    labels = x.clone()
    labels[0, :3] = -100  # only the last target of row 0 counts
    labels[1, 2] = -100
    nll, n = token_nll(model, {"input_ids": x, "labels": labels})
    assert n == 1 + 2
    assert nll == pytest.approx(-3 * math.log(0.75))
    assert mean_loss(model, [{"input_ids": x, "labels": labels}]) == pytest.approx(-math.log(0.75))


def test_perplexity_of_uniform_model_is_vocab_size() -> None:
    model = FixedLogits([0.0] * 7)
    stream = TokenStream(torch.arange(100) % 7)
    p = perplexity(model, stream, window=10, max_windows=5, batch_size=2)
    assert p.perplexity == pytest.approx(7.0)
    assert (p.windows, p.tokens) == (5, 5 * 9)  # every position but the first of each window


def test_perplexity_overlapping_windows_score_only_the_stride() -> None:
    model = FixedLogits([0.0] * 5)
    stream = TokenStream(torch.arange(40) % 5)
    p = perplexity(model, stream, window=10, stride=4, batch_size=3)
    starts = list(range(0, 40 - 10 + 1, 4))
    assert p.windows == len(starts)
    assert p.tokens == 9 + (len(starts) - 1) * 4  # the first window scores 9, later ones their last 4 tokens
    assert p.nll == pytest.approx(math.log(5))


# mix weights (ALGORITHM.md section 5) -----------------------------------------------------------------------------
def test_linear_mix_weights_by_hand() -> None:
    w, dev = mix_weights([3.0, 2.5, 1.0], [2.0, 2.0, 1.5], None, weighting="linear", eta=1.0, uniform=0.1)
    assert dev == [1.0, 0.5, 0.0]
    # proportional to deviation (2/3, 1/3, 0), then 10% spread uniformly
    assert w == pytest.approx([0.9 * 2 / 3 + 0.1 / 3, 0.9 / 3 + 0.1 / 3, 0.1 / 3])


def test_linear_mix_weights_uniform_when_no_deviation() -> None:
    w, dev = mix_weights([1.0, 1.0], [2.0, 3.0], None, weighting="linear", eta=1.0, uniform=0.0)
    assert dev == [0.0, 0.0] and w == pytest.approx([0.5, 0.5])


def test_exp_mix_weights_by_hand() -> None:
    w, _ = mix_weights([2.0, 1.0], [1.0, 1.0], [0.5, 0.5], weighting="exp", eta=2.0, uniform=0.0)
    # softmax(log 0.5 + 2 * [1, 0]) = [e^2, 1] / (e^2 + 1)
    assert w == pytest.approx([math.e**2 / (math.e**2 + 1), 1 / (math.e**2 + 1)])


# group norms and importance ---------------------------------------------------------------------------------------
def toy_set(n_groups: int = 2) -> tuple[StructureSet, dict[str, torch.Tensor]]:
    """Two groups: rows {0,1} / {2,3} of ``up`` (4x3) and columns {0,1} / {2,3} of ``down`` (2x4)."""
    up = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    down = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, 3.0]])
    idx = torch.tensor([[0, 1], [2, 3]])
    slices = [
        SliceSpec("up", 0, idx, zero=True, lora=None, role="producer"),
        SliceSpec("down", 1, idx, zero=False, lora=None, role="consumer"),
    ]
    s = StructureSet(
        "mlp_channel", 0, n_groups, slices, 10, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.bool)
    )
    return s, {"up": up, "down": down}


def test_group_sq_norms_by_hand() -> None:
    s, params = toy_set()
    up_rows = (params["up"] ** 2).sum(1)  # 5, 50, 149, 302
    assert group_sq_norms(s, params, zero_only=True).tolist() == pytest.approx(
        [float(up_rows[0] + up_rows[1]), float(up_rows[2] + up_rows[3])]
    )
    # with the consumer columns: + (1 + 1) and + (4 + 9)
    assert group_sq_norms(s, params).tolist() == pytest.approx([55 + 2, 451 + 13])
    assert MagnitudeImportance(params)(s).tolist() == pytest.approx([math.sqrt(57), math.sqrt(464)])


def test_lora_saliency_terms_by_hand() -> None:
    s, params = toy_set()
    A = nn.Parameter(torch.tensor([[1.0, 0.0, 0.0]]))  # (r=1, in=3)
    B = nn.Parameter(torch.tensor([[1.0], [0.0], [0.0], [2.0]]))  # (out=4, r=1)
    stats = lora_group_stats(s, params, {"up": LoraRef(A, B, 0.5)})
    # s B A has 0.5 at (0, 0) and 1.0 at (3, 0); W[0, 0] = 0, W[3, 0] = 9
    assert stats["d2"].tolist() == pytest.approx([0.25, 1.0])
    assert stats["wd"].tolist() == pytest.approx([0.0, 9.0])
    terms = lora_saliency_terms(stats)
    assert terms["taylor_first_order"].tolist() == pytest.approx([0.0, 9.0])
    assert terms["cosine"][0] == pytest.approx(1.0)  # orthogonal update
    # weighted sum of L2-normalised terms: magnitude only -> ||W_g|| / ||(||W_1||, ||W_2||)||
    w = terms["magnitude"]
    assert weighted_sum(terms, {"magnitude": 1.0}).tolist() == pytest.approx((w / w.norm()).tolist())


class ToyConsumer(nn.Module):
    """embedding (vocab 5 -> 4) -> ``down`` linear (4 -> 2); loss = sum of the outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.down = nn.Linear(4, 2, bias=False)
        with torch.no_grad():
            self.emb.weight.copy_(torch.arange(20, dtype=torch.float32).reshape(5, 4) / 10)
            self.down.weight.copy_(torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, 3.0]]))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.emb


def test_taylor_importance_by_hand() -> None:
    model = ToyConsumer()
    s, _ = toy_set()
    st = Structures([s], ModelShape("llama", 1, 4, 1, 1, 4, 4, 5, True, False, False, False), {}, [])
    taylor = TaylorImportance(model, st)
    x = torch.tensor([[1, 2]])
    taylor.accumulate(lambda: model.down(model.emb(x)).sum())
    # dL/da_c = sum_j W[j, c] = (1, 1, 2, 3); a_c summed over tokens = rows 1 and 2 of the embedding
    a = model.emb.weight[1] + model.emb.weight[2]
    per_channel = torch.tensor([1.0, 1.0, 2.0, 3.0]) * a.detach()
    assert taylor(s).tolist() == pytest.approx([float(per_channel[:2].sum()), float(per_channel[2:].sum())])


def test_protect_keeps_the_top_gamma_by_score() -> None:
    s, _ = toy_set()
    s4 = StructureSet(
        "mlp_channel", 0, 4, s.slices, 10, torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.bool)
    )
    st = Structures([s4], ModelShape("llama", 1, 4, 1, 1, 4, 4, 5, True, False, False, False), {}, [])
    assert protect(st, {s4.key: torch.tensor([0.1, 0.9, 0.5, 0.3])}, 0.5) == {s4.key: [1, 2]}
    assert s4.protected.tolist() == [False, True, True, False]
    assert protect(st, {s4.key: torch.tensor([0.1, 0.9, 0.5, 0.3])}, 0.0) == {s4.key: []}
    analysis = Analysis(1.0, [], {s4.key: [3]})
    analysis.apply(st)
    assert s4.protected.tolist() == [False, False, False, True]


# family registry --------------------------------------------------------------------------------------------------
def test_family_registry() -> None:
    assert set(supported_model_types()) >= {"llama", "mistral", "qwen2"}
    assert get_family("qwen2").qkv_bias({}) and not get_family("qwen2").o_bias({})
    with pytest.raises(UnsupportedModelError, match="not supported; supported: llama"):
        get_family("gpt2")
    with pytest.raises(ValueError, match="registered already"):
        register_family(Family("llama"))
    cfg = {
        "model_type": "toyllama",
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "intermediate_size": 48,
        "vocab_size": 100,
    }
    with pytest.raises(UnsupportedModelError):
        ModelShape.from_config(cfg)
    register_family(Family("toyllama", qkv_bias=lambda c: True))  # one registration and the budget knows it
    try:
        shape = ModelShape.from_config(cfg)
        assert shape.qkv_bias and not shape.o_bias and shape.num_kv_heads == 4
    finally:
        from lorashear import families

        families._FAMILIES.pop("toyllama")


# sanity checks (issue 7, item 6) -----------------------------------------------------------------------------------
def test_check_sane_catches_uniform_and_non_finite_output() -> None:
    model = build_model(CASES[0])
    probe = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    assert check_sane(model, probe, stage="prune") > 0
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied: every logit 0 -> uniform output
    with pytest.raises(DivergedError, match="uniform output") as err:
        check_sane(model, probe, stage="recover", step=7)
    assert err.value.field == "recovery.lr" and err.value.user_error and err.value.code == "diverged"
    assert "step 7" in err.value.message
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(DivergedError, match="non-finite") as err:
        check_sane(model, probe, stage="prune")
    assert err.value.field == "lhspg.lr"


# hooks ------------------------------------------------------------------------------------------------------------
def test_hooks_checkpoint_on_cancel_and_periodically() -> None:
    saved: list[LoopState | None] = []
    events = []
    hooks = Hooks(events.append, lambda: len(saved) >= 2, saved.append, checkpoint_every=3)
    snap = lambda: LoopState("prune", {"step": len(saved)})  # noqa: E731
    for step in range(1, 7):
        hooks.step_done(step, 6, snap)  # saves at 3 (not at 6: the stage end does)
    assert [s.meta for s in saved if s] == [{"step": 0}]
    hooks.step_done(3, 6, snap)
    from lorashear.errors import Cancelled

    with pytest.raises(Cancelled):
        hooks.cancel_point("prune", snap)
    assert len(saved) == 3 and events[-1].message.startswith("cancelled")


# typed run state and checkpoint round trip -------------------------------------------------------------------------
def test_run_state_and_checkpoint_round_trip(tmp_path) -> None:
    import json

    from lorashear import runstate
    from lorashear.evaluation import EvaluationResult, Perplexity
    from lorashear.optim import PruneResult
    from lorashear.recovery import RecoveryResult

    state = runstate.RunState("abc", stage_done=4, reference_losses={"wiki": 2.5})
    state.dense = EvaluationResult(Perplexity(12.0, math.log(12.0), 128, 128, 4, 508, "eval.txt"), {"text": "hi"})
    state.analysis = Analysis(2.4, [{"layer": 0, "deviation": 0.1}], {"mlp_channel@0": [1, 2]})
    state.prune = PruneResult({"mlp_channel@0": [0, 3]}, [{"period": 0}], [3.0, 2.9], 1)
    state.recovery = RecoveryResult([{"stage": 1}], {"1": 0}, [2.0])
    state.timings["load"] = {"wall_s": 1.5}
    again = runstate.RunState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert again == state

    model = build_model(CASES[1])
    gen = torch.Generator().manual_seed(5)
    loop = LoopState("recover", {"progress": {"step": 3}}, {"opt.0.exp_avg": torch.ones(3)})
    runstate.save(tmp_path / "ck", state, model, gen, loop)
    gen_draw = torch.randint(0, 100, (4,), generator=gen)
    fresh = build_model(CASES[1], seed=1)
    resumed = runstate.load(tmp_path / "ck", "abc")
    assert resumed is not None and resumed.state == state
    assert resumed.loop is not None and resumed.loop.meta == loop.meta
    assert torch.equal(resumed.loop.tensors["opt.0.exp_avg"], torch.ones(3))
    gen2 = torch.Generator()
    resumed.restore(fresh, gen2)
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    assert torch.equal(torch.randint(0, 100, (4,), generator=gen2), gen_draw)
    from lorashear.errors import CheckpointError

    with pytest.raises(CheckpointError, match="different spec"):
        runstate.load(tmp_path / "ck", "other")


# distillation (issue 9 lever) ----------------------------------------------------------------------------------------
def test_distillation_loss_by_hand() -> None:
    from lorashear.training import distillation_loss

    teacher = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [5.0, 5.0]]])  # uniform at the two scored positions
    student = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0], [1.0, 0.0]]])  # (3/4, 1/4), then uniform
    labels = torch.tensor([[0, 1, 1]])
    # position 0: KL((1/2, 1/2) || (3/4, 1/4)) = 1/2 log(4/3); position 1: 0; mean over the 2 scored positions
    assert float(distillation_loss(student, teacher, labels)) == pytest.approx(0.25 * math.log(4 / 3))
    labels[0, 2] = -100  # position 1 no longer scored
    assert float(distillation_loss(student, teacher, labels)) == pytest.approx(0.5 * math.log(4 / 3))
    assert float(distillation_loss(teacher, teacher, torch.tensor([[0, 1, 1]]))) == pytest.approx(0.0, abs=1e-7)


# recovery learning-rate schedule (issue 9 lever) ---------------------------------------------------------------------
def test_lr_factor_by_hand() -> None:
    from lorashear.config import LR_SCHEDULE_NAMES
    from lorashear.training import LR_SCHEDULES, lr_factor

    assert tuple(LR_SCHEDULES) == LR_SCHEDULE_NAMES  # the spec validates against the same names
    assert [lr_factor("constant", s, 4) for s in range(4)] == [1.0] * 4
    # 4 decay steps, evaluated at the midpoints 1/8, 3/8, 5/8, 7/8
    assert [lr_factor("linear", s, 4) for s in range(4)] == pytest.approx([7 / 8, 5 / 8, 3 / 8, 1 / 8])
    cos = [lr_factor("cosine", s, 4) for s in range(4)]
    assert cos == pytest.approx([0.5 * (1 + math.cos(math.pi * p)) for p in (1 / 8, 3 / 8, 5 / 8, 7 / 8)])
    assert cos[0] + cos[3] == pytest.approx(1.0) and all(0 < c <= 1 for c in cos)
    # 2 warm-up steps (1/3, 2/3), then linear over the remaining 2 (midpoints 1/4, 3/4)
    assert [lr_factor("linear", s, 4, warmup=2) for s in range(4)] == pytest.approx([1 / 3, 2 / 3, 3 / 4, 1 / 4])
    with pytest.raises(KeyError):
        lr_factor("step", 0, 4)


# LHSPG batch source (issue 9 lever) ----------------------------------------------------------------------------------
def test_lhspg_sampler_mixes_pool_windows_and_instruction_records() -> None:
    from lorashear.data import RecordSet, SubDataset
    from lorashear.inputs import JobData

    pool = TokenStream(torch.arange(100, 400))
    records = RecordSet([([1, 2], [3, 4, 5]), ([6], [7])], pad_id=0)
    data = JobData(pool, pool, [], [SubDataset("alpaca", records, [])], pool)

    def draws(share: float, n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        sample = data.lhspg_sampler(2, 8, share, gen)
        return [sample() for _ in range(n)]

    # share 0: exactly the pool's batches, no extra draws from the generator
    gen = torch.Generator().manual_seed(0)
    plain = [pool.sample(2, 8, gen) for _ in range(5)]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(draws(0.0, 5), plain, strict=True))
    # share 1: every batch is records: right-padded, loss on the responses only
    for b in draws(1.0, 5):
        assert "attention_mask" in b and int(b["input_ids"].max()) < 100
        assert set(b["labels"][b["labels"] != -100].tolist()) <= {3, 4, 5, 7}
    # share 0.5: both sources, about half each, and the same draws for the same seed (resume-safe)
    mixed = draws(0.5, 200)
    n_records = sum("attention_mask" in b for b in mixed)
    assert 60 < n_records < 140
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(mixed, draws(0.5, 200), strict=True))
    assert all(b["input_ids"].shape == (2, 8) for b in mixed if "attention_mask" not in b)


def test_read_corpus_renders_record_files_for_calibration(tmp_path) -> None:
    import json

    from lorashear.data import PROMPT_TEMPLATES, read_corpus
    from lorashear.errors import DataError

    recs = tmp_path / "calib.jsonl"
    recs.write_text(
        json.dumps({"instruction": "Name a colour.", "output": "Blue."}) + "\n" + json.dumps({"text": "A story."})
    )
    prompt = "### Instruction:\nName a colour.\n\n### Response:\n"
    assert read_corpus(recs, "data.calibration") == prompt + "Blue.\nA story."
    qa = PROMPT_TEMPLATES["question_answer"]
    assert read_corpus(recs, "data.calibration", qa) == "Question: Name a colour.\nAnswer: Blue.\nA story."
    txt = tmp_path / "calib.txt"
    txt.write_text("one\n\ntwo\n")
    assert read_corpus(txt, "data.calibration") == "one\ntwo"
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError) as info:
        read_corpus(tmp_path / "bad.json", "data.calibration")
    assert info.value.field == "data.calibration" and "bad.json" in str(info.value)


def test_prompt_templates_render_records_and_match_the_spec_names() -> None:
    """``data.prompt_template`` (issue 9): the default renders exactly the Alpaca prompt every earlier run used;
    ``question_answer`` gives lm-eval's ``Question:`` / ``Answer:`` split (target after one space); a custom format
    string fills ``{instruction}`` and ``{input}`` (empty when absent). Every name the spec accepts renders."""
    from lorashear.config import PROMPT_TEMPLATE_NAMES
    from lorashear.data import PROMPT_TEMPLATES, format_record, prompt_template

    assert set(PROMPT_TEMPLATES) == set(PROMPT_TEMPLATE_NAMES)
    row = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}
    with_input = {"instruction": "Translate.", "input": "chat", "output": "cat"}
    assert format_record(row) == ("### Instruction:\nAdd 2 and 3.\n\n### Response:\n", "5")
    assert format_record(with_input) == ("### Instruction:\nTranslate.\n\n### Input:\nchat\n\n### Response:\n", "cat")
    qa = prompt_template("question_answer")
    assert format_record(row, qa) == ("Question: Add 2 and 3.\nAnswer:", " 5")
    assert format_record(with_input, qa) == ("Question: Translate.\nchat\nAnswer:", " cat")
    custom = prompt_template("<u>{instruction} {input}</u>{{x}}")
    assert format_record(with_input, custom) == ("<u>Translate. chat</u>{x}", "cat")
    assert format_record(row, custom) == ("<u>Add 2 and 3. </u>{x}", "5")
    assert format_record({"text": "plain"}, qa) == ("", "plain")
