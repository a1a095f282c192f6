"""Which weights get projected: param_groups() on a real (tiny) LLaMA."""

from __future__ import annotations

import pytest
import torch
from tiny_lm import tiny_llama
from torch import nn

from subspace_optim import SubspaceAdamW, param_groups, select_target_modules

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def model():
    return tiny_llama(hidden=32, intermediate=64, layers=2, heads=2)


def _names(group):
    """param_groups() hands torch (name, param) pairs; torch turns them into "param_names"."""
    return {name for name, _ in group["params"]}


def test_all_linear_projects_every_block_linear_but_not_head_embeddings_or_norms(model):
    groups = param_groups(model, "all-linear", rank=8, update_gap=10, scale=0.5)
    projected, matrices, vectors = groups
    assert _names(projected) == {
        f"model.layers.{i}.{blk}.{p}.weight"
        for i in range(2)
        for blk, p in [
            ("self_attn", "q_proj"),
            ("self_attn", "k_proj"),
            ("self_attn", "v_proj"),
            ("self_attn", "o_proj"),
            ("mlp", "gate_proj"),
            ("mlp", "up_proj"),
            ("mlp", "down_proj"),
        ]
    }
    assert projected["rank"] == 8 and projected["update_gap"] == 10 and projected["scale"] == 0.5
    assert _names(matrices) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert matrices["rank"] is None
    assert all("norm" in n for n in _names(vectors))
    assert vectors["weight_decay"] == 0.0 and vectors["rank"] is None
    total = sum(len(g["params"]) for g in groups)
    assert total == len(list(model.parameters()))


def test_substring_list_and_regex_like_hf(model):
    attn = select_target_modules(model, ["attn"])
    assert len(attn) == 8 and all("self_attn" in n for n in attn)
    mlp = select_target_modules(model, r"model\.layers\.\d+\.mlp\.(gate|up)_proj")
    assert mlp == [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj")]
    # A regex string must match the whole name (HF semantics), so a bare substring string matches nothing.
    with pytest.raises(ValueError, match="matched no linear layer.*all-linear"):
        select_target_modules(model, "attn")


def test_weight_decay_goes_to_matrices_not_vectors(model):
    groups = param_groups(model, ["mlp"], rank=4, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.1, 0.0]


def test_optimizer_level_rank_does_not_leak_into_plain_groups(model):
    groups = param_groups(model, ["mlp"], rank=4)
    opt = SubspaceAdamW(groups, rank=16, lr=1e-3)
    assert [g["rank"] for g in opt.param_groups] == [4, None, None]
    assert [set(g["param_names"]) for g in opt.param_groups] == [_names(g) for g in groups]


def test_bad_target_modules_type():
    with pytest.raises(TypeError, match="list of str"):
        select_target_modules(nn.Sequential(nn.Linear(2, 2)), [1, 2])


def test_param_groups_train_a_llama_step(model):
    opt = SubspaceAdamW(param_groups(model, "all-linear", rank=4), lr=1e-3)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    projected = [n for n, s in opt.subspace_metrics()["params"].items()]
    assert len(projected) == 14 and all(any(p in n for p in PROJ) for n in projected)


def test_head_is_selected_only_when_named(model):
    assert "lm_head" not in select_target_modules(model, "all-linear")
    assert select_target_modules(model, ["lm_head"]) == ["lm_head"]
