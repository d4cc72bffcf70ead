"""LHSPG invariants on tiny configs (ALGORITHM.md section 3)."""

from __future__ import annotations

import copy

import pytest
import torch

from lorashear.config import LHSPGConfig, LoRAConfig
from lorashear.graph import discover
from lorashear.modeling import attach_lora
from lorashear.optim import LHSPG, spread

from .conftest import Case, build_model


def setup(case: Case, mode: str):
    model = attach_lora(build_model(case), LoRAConfig(rank=4, target_modules=list(case.lora_targets)))
    st = discover(model)
    quotas: dict[str, dict[int, int]] = {}
    for s in st.sets:
        if s.kind in ("kv_group", "attention_head"):
            quotas[s.key] = {0: 1}
            s.protected[s.n_groups - 1] = True  # marked unprunable by the analysis
        elif s.kind == "mlp_channel":
            quotas[s.key] = {0: 10}
            s.protected[:5] = True
    cfg = LHSPGConfig(mode=mode, warmup_steps=2, periods=3, period_steps=4, lr=1e-2, lambda_init=3.0)
    return model, st, quotas, LHSPG(model, st, quotas, cfg)


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    return torch.randint(3, 512, (2, 16), generator=g)


def train_step(model, opt: LHSPG, step: int) -> None:
    x = batch(step)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("mode", ["decay", "hsp"])
@pytest.mark.parametrize(
    "case", [Case("llama-mha", "llama", 4, 4), Case("qwen2-gqa2-bias", "qwen2", 4, 2)], ids=["mha", "gqa-bias"]
)
def test_exact_counts_and_removed_stay_zero(case: Case, mode: str) -> None:
    model, st, quotas, opt = setup(case, mode)
    cfg = opt.cfg
    removed_so_far: dict[str, set[int]] = {k: set() for k in quotas}
    for step in range(cfg.total_steps):
        train_step(model, opt, step)
        period, t = opt.phase(step)
        for key in quotas:
            zero = set(opt.zero_groups(key))
            assert removed_so_far[key] <= zero, "a removed group came back"
        if period >= 0 and t == cfg.period_steps - 1:
            for key, q in quotas.items():
                expect = sum(spread(q[0], cfg.periods)[: period + 1])
                assert len(opt.pruned[key]) == expect
                assert opt.pruned[key] <= set(opt.zero_groups(key))
                removed_so_far[key] = set(opt.pruned[key])
    for key, q in quotas.items():
        s = opt.sets[key]
        assert len(opt.removed()[key]) == q[0]
        assert not any(s.protected[g] for g in opt.removed()[key]), "a protected group was removed"
    if mode == "hsp":
        assert opt.projected_early > 0, "the half-space projection never fired before a period's end"


def test_unprunable_groups_get_plain_adamw_updates() -> None:
    case = Case("llama-gqa2", "llama", 4, 2)
    model, st, quotas, opt = setup(case, "decay")
    for step in range(3):  # into the first period: active redundant groups exist
        train_step(model, opt, step)
    assert any(opt.active.values())
    x = batch(99)
    model(input_ids=x, labels=x).loss.backward()
    # reference: a plain AdamW with the same state, on copies, with the same clipped gradients
    params = opt.lora_params
    ref_params = [p.detach().clone().requires_grad_(True) for p in params]
    for rp, p in zip(ref_params, params, strict=False):
        rp.grad = p.grad.detach().clone()
    torch.nn.utils.clip_grad_norm_(ref_params, opt.cfg.max_grad_norm)
    ref = torch.optim.AdamW(ref_params, lr=opt.cfg.lr, weight_decay=opt.cfg.weight_decay)
    ref.load_state_dict(copy.deepcopy(opt.inner.state_dict()))  # load_state_dict may alias tensors
    ref.step()
    opt.step()
    index = {id(p): i for i, p in enumerate(params)}
    named = dict(model.named_parameters())
    checked = 0
    for key in quotas:
        s = opt.sets[key]
        touched = set(opt.active[key]) | opt.pruned[key]
        keep = [g for g in torch.nonzero(s.protected).flatten().tolist() if g not in touched]
        for sl in s.slices:
            if sl.lora != "B":
                continue
            p = named[sl.param]
            rows = sl.index[torch.tensor(keep)].flatten()
            diff = (p.detach()[rows] - ref_params[index[id(p)]].detach()[rows]).abs().max()
            assert torch.equal(p.detach()[rows], ref_params[index[id(p)]].detach()[rows]), (sl.param, float(diff))
            checked += 1
    assert checked > 0


def test_state_dict_round_trip_continues_identically() -> None:
    case = Case("llama-gqa2", "llama", 4, 2)
    model_a, _, _, opt_a = setup(case, "hsp")
    for step in range(5):
        train_step(model_a, opt_a, step)
    state = opt_a.state_dict()
    snapshot = {n: p.detach().clone() for n, p in model_a.named_parameters()}
    model_b, _, _, opt_b = setup(case, "hsp")
    with torch.no_grad():
        for n, p in model_b.named_parameters():
            p.copy_(snapshot[n])
    opt_b.load_state_dict(state)
    for step in range(5, opt_a.cfg.total_steps):
        train_step(model_a, opt_a, step)
        train_step(model_b, opt_b, step)
    for (n, a), (_, b) in zip(model_a.named_parameters(), model_b.named_parameters(), strict=False):
        assert torch.equal(a, b), n
    assert opt_a.removed() == opt_b.removed()


@pytest.mark.parametrize("importance", ["taylor", "fisher"])
def test_taylor_importance_prunes_exactly_and_resumes_to_the_same_weights(importance: str) -> None:
    """``lhspg.importance: taylor`` / ``fisher`` (issue 9): exact counts, removed groups zero, and a cancel
    mid-period resumes (optimizer moments, group sets and the accumulated sums in the loop state) to the same
    weights."""
    from lorashear.errors import Cancelled
    from lorashear.events import Hooks
    from lorashear.optim import prune

    case = Case("llama-gqa2", "llama", 4, 2)
    cfg = LHSPGConfig(importance=importance, warmup_steps=2, periods=2, period_steps=3, lr=1e-2)

    def fresh():
        model = attach_lora(build_model(case), LoRAConfig(rank=4))
        st = discover(model)
        quotas = {
            s.key: {0: 1 if s.kind == "kv_group" else 6} for s in st.sets if s.kind in ("kv_group", "mlp_channel")
        }
        gen = torch.Generator().manual_seed(0)
        return (
            model,
            st,
            quotas,
            lambda: {"input_ids": (x := torch.randint(3, 512, (2, 16), generator=gen)), "labels": x},
        )

    model, st, quotas, sample = fresh()
    ref = prune(model, st, quotas, cfg, sample)
    assert {k: len(v) for k, v in ref.removed.items()} == {k: sum(q.values()) for k, q in quotas.items()}
    saved = []
    steps = {"n": 0}

    def on_event(e) -> None:
        steps["n"] = e.step

    model2, st2, quotas2, sample2 = fresh()
    hooks = Hooks(on_event, lambda: steps["n"] >= 4, saved.append)
    with pytest.raises(Cancelled):
        prune(model2, st2, quotas2, cfg, sample2, hooks=hooks)
    assert saved and any(k.startswith("taylor.") for k in saved[-1].tensors)
    again = prune(model2, st2, quotas2, cfg, sample2, resume=saved[-1])
    assert again.removed == ref.removed and again.losses == ref.losses
    for (n, a), (_, b) in zip(model.named_parameters(), model2.named_parameters(), strict=True):
        assert torch.equal(a, b), n


def test_fisher_importance_is_the_squared_joint_term_of_each_group_per_sequence() -> None:
    """``lhspg.importance: fisher`` (issue 9): a group's score is ``sum_seq (dL/dm_g)^2`` where ``m_g`` scales the
    group's channels at their consumer's input (the directional derivative of removing the group), measured here
    independently with a mask on one sequence at a time; plain Taylor sums ``|.|`` per channel instead."""
    from lorashear.importance import TaylorImportance

    case = Case("llama-gqa2", "llama", 4, 2)
    model = build_model(case).eval()
    st = discover(model)
    sets = [s for s in st.sets if s.kind in ("mlp_channel", "kv_group") and s.layer == 1]
    fisher = TaylorImportance(model, st, keys=[s.key for s in sets], fisher=True)
    x = torch.randint(3, 512, (3, 16), generator=torch.Generator().manual_seed(0))

    def loss_of(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    with fisher.recording(), torch.enable_grad():
        loss_of(x).backward()  # mean over the batch: the per-sequence terms below carry 1/3 of it each
    model.zero_grad(set_to_none=True)
    mods = dict(model.named_modules())
    for sset in sets:
        (sl,) = [s for s in sset.slices if s.role == "consumer" and s.dim == 1 and s.lora is None]
        expected = torch.zeros(sset.n_groups, dtype=torch.float64)
        for b in range(x.shape[0]):
            mask = torch.ones(mods[sl.param.rsplit(".", 1)[0]].in_features, requires_grad=True)
            hook = mods[sl.param.rsplit(".", 1)[0]].register_forward_pre_hook(lambda _m, a, m=mask: (a[0] * m,))
            try:
                (loss_of(x[b : b + 1]) / x.shape[0]).backward()
            finally:
                hook.remove()
            per_group = mask.grad.double()[sl.index].sum(-1)
            expected += per_group.pow(2)
            model.zero_grad(set_to_none=True)
        assert bool((expected > 0).all())
        torch.testing.assert_close(fisher(sset), expected, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("criterion", ["taylor", "magnitude", "random"])
def test_one_shot_baselines_zero_exactly_the_quota_and_slice_exactly(criterion: str) -> None:
    """The one-shot rows of the quality benchmark (issue 9) use the same structures, quotas and exactness check."""
    from lorashear.baselines import one_shot
    from lorashear.compression import compress

    case = Case("llama-gqa2", "llama", 4, 2)
    model = attach_lora(build_model(case), LoRAConfig(rank=4))
    st = discover(model)
    st.by_key()["mlp_channel@0"].protected[:3] = True
    quotas = {s.key: {0: 1 if s.kind == "kv_group" else 6} for s in st.sets if s.kind in ("kv_group", "mlp_channel")}
    x = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    removed = one_shot(model, st, quotas, criterion, [{"input_ids": x}], seed=1)
    assert {k: len(v) for k, v in removed.items()} == {k: sum(q.values()) for k, q in quotas.items()}
    assert not set(removed["mlp_channel@0"]) & {0, 1, 2}, "protected groups are never chosen"
    res = compress(model, st, removed, probe_ids=x)
    assert res.exact and res.max_abs_logit_diff < 1e-4
    with pytest.raises(ValueError, match="unknown one-shot criterion"):
        one_shot(model, st, quotas, "oracle", [])
