"""Matrix over tiny configs: structure counts, exact slicing, plan replay, export and reload, adapters."""

from __future__ import annotations

import copy

import pytest
import torch

from lorashear.compression import (
    apply_plan,
    check_exact,
    kept_indices,
    make_plan,
    rescale_norms_,
    slice_,
    stock_loadable,
)
from lorashear.config import LoRAConfig
from lorashear.errors import AdapterMismatchError
from lorashear.graph import discover
from lorashear.modeling import attach_lora, count_params, model_shape

from .conftest import Case, build_model


def lora_model(case: Case) -> torch.nn.Module:
    model = attach_lora(build_model(case), LoRAConfig(rank=4, target_modules=list(case.lora_targets)))
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking LoRA, so slicing must carry lora_B rows and lora_A columns too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def uniform_removal(st, case: Case) -> dict[str, list[int]]:
    """One KV group (head, for MHA), one query head per surviving group (GQA) and 12 channels per layer."""
    removed: dict[str, list[int]] = {}
    rep = case.heads // case.kv_heads
    for s in st.sets:
        if s.kind in ("kv_group", "attention_head"):
            removed[s.key] = [s.layer % s.n_groups]
        elif s.kind == "query_head" and rep > 1 and not case.attention_bias:
            removed[s.key] = [j * rep + (s.layer + j) % rep for j in range(case.kv_heads)]
        elif s.kind == "mlp_channel":
            removed[s.key] = list(range(s.layer, 48, 4))
    return removed


def zero_groups_(model, st, removed) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    by_key = st.by_key()
    with torch.no_grad():
        for key, groups in removed.items():
            s = by_key[key]
            g = torch.tensor(groups)
            for sl in s.slices:
                if sl.zero:
                    params[sl.param].index_fill_(sl.dim, sl.index[g].flatten(), 0.0)


def test_structure_counts_match_config(case: Case) -> None:
    model = lora_model(case)
    shape = model_shape(model)
    assert count_params(model) == shape.total_params
    st = discover(model, hidden=True)
    kinds = [s.kind for s in st.sets]
    rep = case.heads // case.kv_heads
    h, hd = 32, 8
    if rep == 1:
        assert kinds.count("attention_head") == 2 and "kv_group" not in kinds
    else:
        assert kinds.count("kv_group") == 2 and kinds.count("query_head") == 2
    assert kinds.count("mlp_channel") == 2 and kinds.count("hidden_dim") == 1
    qkv_bias = case.attention_bias or case.model_type == "qwen2"
    for s in st.sets:
        if s.kind in ("kv_group", "attention_head"):
            assert s.n_groups == case.kv_heads
            assert s.params_per_group == (2 * rep + 2) * hd * h + qkv_bias * (rep + 2) * hd
        if s.kind == "query_head":
            assert s.n_groups == case.heads and s.cluster.tolist() == [i // rep for i in range(case.heads)]
        if s.kind == "mlp_channel":
            assert s.n_groups == 48 and s.params_per_group == 3 * h + 2 * case.mlp_bias
        if s.kind == "hidden_dim":
            assert s.n_groups == h
    # the LoRA rank is traced as its own space and never becomes a structure
    assert st.spaces["lora_rank"] == 2 * len(case.lora_targets)
    assert not any("lora_A" in sl.param and sl.dim == 0 for s in st.sets for sl in s.slices)


def test_sliced_equals_group_sparse_and_exports(case: Case, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model = lora_model(case)
    st = discover(model)
    removed = uniform_removal(st, case)
    zero_groups_(model, st, removed)
    x = torch.randint(3, 512, (2, 12))
    with torch.no_grad():
        sparse = model(input_ids=x).logits
    kept = kept_indices(st, removed)
    slice_(model, kept)
    with torch.no_grad():
        sliced = model(input_ids=x).logits
    assert check_exact(sparse, sliced, tol=1e-4, what=case.id) <= 1e-4
    cfg = model.config
    rep = case.heads // case.kv_heads
    assert cfg.num_key_value_heads == case.kv_heads - 1
    assert cfg.num_attention_heads == cfg.num_key_value_heads * (rep - (rep > 1 and not case.attention_bias))
    assert cfg.intermediate_size == 36 and cfg.head_dim == 8
    assert count_params(model) == model_shape(model).total_params

    merged, _note = stock_loadable(model.merge_and_unload())
    merged.save_pretrained(str(tmp_path / "m"))
    loaded, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        again = loaded.eval()(input_ids=x, use_cache=False).logits
    assert (again - sparse).abs().max() < 1e-4
    out = loaded.generate(input_ids=x[:1, :4], max_new_tokens=5, do_sample=False, use_cache=True)
    assert out.shape == (1, 9)  # generate() with a KV cache works on the pruned layout


def test_plan_replays_to_identical_weights(case: Case) -> None:
    model = lora_model(case)
    st = discover(model)
    removed = uniform_removal(st, case)
    zero_groups_(model, st, removed)
    kept = kept_indices(st, removed)
    slice_(model, kept)
    plan = make_plan(kept, model.config.to_dict(), norms=[], hidden_before=32)
    dense = build_model(case)  # same seed: the dense weights the job started from
    apply_plan(dense, plan)
    base = {k: v for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    base = {k.replace(".base_layer", ""): v for k, v in base.items()}
    replayed = dense.state_dict()
    assert set(base) == set(replayed)
    for k, v in replayed.items():
        assert torch.equal(v, base[k]), k


def test_hidden_dimension_removal_is_exact() -> None:
    """RMSNorm's weight times sqrt(d / d') and epsilon times d / d' keep the sliced model's logits equal."""
    case = Case("llama-gqa2", "llama", 4, 2)
    model = lora_model(case)
    st = discover(model, hidden=True)
    hidden = next(s for s in st.sets if s.kind == "hidden_dim")
    removed = {hidden.key: [3, 17, 30]}
    zero_groups_(model, st, removed)
    x = torch.randint(3, 512, (2, 12))
    with torch.no_grad():
        sparse = model(input_ids=x).logits
    kept = kept_indices(st, removed)
    slice_(model, kept)
    norms = [sl.param for sl in hidden.slices if sl.param in hidden.meta["norms"]]
    eps = model.config.rms_norm_eps
    rescale_norms_(model, norms, 32, 29)
    with torch.no_grad():
        sliced = model(input_ids=x).logits
    assert model.config.hidden_size == 29
    assert model.config.rms_norm_eps == pytest.approx(eps * 32 / 29)
    norm_modules = [m for n, m in model.named_modules() if n.endswith("norm")]
    assert norm_modules and all(m.variance_epsilon == pytest.approx(eps * 32 / 29) for m in norm_modules)
    assert (sliced - sparse).abs().max() < 1e-5


def test_mismatched_adapter_fails_loudly(tmp_path) -> None:
    case = Case("llama-gqa2", "llama", 4, 2)
    dense = lora_model(case)
    dense.save_pretrained(str(tmp_path / "dense_adapter"))
    pruned = copy.deepcopy(dense)
    st = discover(pruned)
    removed = uniform_removal(st, case)
    zero_groups_(pruned, st, removed)
    slice_(pruned, kept_indices(st, removed))
    pruned.save_pretrained(str(tmp_path / "pruned_adapter"))
    base = pruned.unload()
    with pytest.raises(AdapterMismatchError, match="shape"):
        attach_lora(base, LoRAConfig(), adapter=tmp_path / "dense_adapter")
    with pytest.raises(AdapterMismatchError):
        attach_lora(build_model(case), LoRAConfig(), adapter=tmp_path / "pruned_adapter")
    ok = attach_lora(base, LoRAConfig(), adapter=tmp_path / "pruned_adapter")  # the matching base loads
    assert any("lora_B" in n for n, _ in ok.named_parameters())
