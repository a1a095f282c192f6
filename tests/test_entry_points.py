"""Every entry point trains exactly the trainable parameters the model has when training starts, and says
so clearly when it cannot: frozen targets, models changed after the optimizer was built (TRL/PEFT
wrapping), tied heads, APOLLO settings we do not implement, and warnings that point at the user's line."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
from tiny_lm import tiny_llama  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from subspace_optim import SubspaceAdamW, param_groups  # noqa: E402
from subspace_optim.integrations.transformers import build_optimizer, create_optimizer  # noqa: E402


def _model():
    return tiny_llama(hidden=32, intermediate=64, layers=1, heads=2, vocab=128, seed=0)


def _tied_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=128,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def _loss(model, seed=0):
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(seed))
    return model(input_ids=ids, labels=ids).loss


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_targets_that_are_all_frozen_warn_and_train_the_rest_with_adamw():
    model = _model()
    for name, p in model.named_parameters():
        p.requires_grad_("mlp" not in name and "self_attn" not in name)
    with pytest.warns(UserWarning, match=r"matched only frozen weights \(7, e\.g\. .*\): no matrix is projected"):
        groups = param_groups(model, "all-linear", rank=4)
    assert all(g["rank"] is None for g in groups)
    opt = SubspaceAdamW(groups, lr=1e-2)
    _loss(model).backward()
    opt.step()
    assert all(not p.requires_grad or int(opt.state[p]["step"]) == 1 for p in model.parameters() if p.grad is not None)


def test_a_model_with_nothing_trainable_is_refused_clearly():
    model = _model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        param_groups(model, "all-linear", rank=4)


def _peft_like_wrap(model):
    """What PEFT's LoRA does in place: freeze the base weights and add trainable low-rank adapters."""
    model.requires_grad_(False)
    layer = model.model.layers[0].self_attn.q_proj
    layer.lora_A = nn.Linear(32, 4, bias=False)
    layer.lora_B = nn.Linear(4, 32, bias=False)
    return [layer.lora_A.weight, layer.lora_B.weight]


def test_an_optimizer_built_before_the_model_was_wrapped_is_refused_at_its_first_step():
    """The TRL + peft_config case: the optimizer holds only base weights that are frozen by the time training
    starts. The first step raises, naming the factory, before anything changes; built after the wrap (what
    the factory does) it trains the adapters."""
    model = _model()
    opt = build_optimizer(model, rank=4, lr=1e-2)
    adapters = _peft_like_wrap(model)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = _params(model)
    with pytest.raises(ValueError, match=r"holds no trainable parameter.*SubspaceAdamWFactory.*Nothing was changed"):
        opt.step()
    with pytest.raises(ValueError, match="holds no trainable parameter"):
        opt.step()  # still refused: the check is not spent by a failure
    assert not opt.state and all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    fresh = build_optimizer(model, rank=4, lr=1e-2, target_modules=["lora_"])
    fresh.step()
    assert all(not torch.equal(a, before[n]) for n, a in model.named_parameters() if "lora_" in n)
    assert {id(p) for g in fresh.param_groups for p in g["params"]} == {id(p) for p in adapters}


def test_missing_trainable_parameters_are_refused_and_a_complete_optimizer_passes_once():
    model = _model()
    opt = create_optimizer(model, TrainingArguments(output_dir="unused", optim_args="rank=4", report_to=[]))
    _loss(model).backward()
    opt.step()  # holds every trainable parameter: passes, and the check is done
    copy.deepcopy(opt)
    pickle.loads(pickle.dumps(opt))  # the check holds a weak reference only; the optimizer still copies
    model.lm_head = nn.Linear(32, 128, bias=False)  # a new trainable parameter after the check passed
    _loss(model).backward()
    opt.step()  # checked once, at the first step: later changes are the user's business

    late = _model()
    opt2 = build_optimizer(late, rank=4, lr=1e-2)
    late.extra = nn.Linear(4, 4)
    _loss(late).backward()
    late.extra.weight.grad = torch.randn(4, 4)
    with pytest.raises(ValueError, match=r"misses 2 trainable parameter\(s\).*extra\.weight"):
        opt2.step()


def test_project_output_head_leaves_a_tied_head_in_adamw():
    model = _tied_model()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with pytest.warns(UserWarning, match="tied to the input embedding: it stays in plain AdamW"):
        opt = build_optimizer(model, rank=4, lr=1e-2, project_output_head=True)
    head = model.get_output_embeddings().weight
    projected = [p for g in opt.param_groups if g["rank"] is not None for p in g["params"]]
    assert all(p is not head for p in projected)
    untied = _model()
    opt = build_optimizer(untied, rank=4, lr=1e-2, project_output_head=True)
    projected = [p for g in opt.param_groups if g["rank"] is not None for p in g["params"]]
    assert any(p is untied.get_output_embeddings().weight for p in projected)


def test_apollo_settings_are_mapped_under_apollo_and_refused_elsewhere():
    """optim="apollo_adamw" is mapped onto APOLLO's configuration (tests/test_apollo_migration.py has the
    mapping); APOLLO's keys under another optim are refused rather than silently dropped."""
    opt = create_optimizer(_model(), TrainingArguments(output_dir="unused", optim="apollo_adamw", report_to=[]))
    projected = [g for g in opt.param_groups if g["rank"] is not None]
    assert projected and all(
        (g["refresh"], g["seed_stream"], g["residual"], g["moments"], g["limiter"])
        == ("seeded", "apollo", "apollo", "keep", "raw")
        for g in projected
    )
    for key in ("proj=random", "scale_type=channel"):
        args = TrainingArguments(output_dir="unused", optim_args=f"rank=4, {key}", report_to=[])
        with pytest.raises(ValueError, match=r"is APOLLO's.*Remove it"):
            create_optimizer(_model(), args)


def test_rank_fallback_warnings_are_grouped_and_point_at_the_callers_line():
    model = _model()
    opt = SubspaceAdamW(param_groups(model, "all-linear", rank=40), lr=1e-2)  # 40 > 32: every matrix falls back
    _loss(model).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    fallbacks = [w for w in caught if "exceeds" in str(w.message)]
    assert len(fallbacks) == 1, [str(w.message) for w in fallbacks]
    assert "rank=40 exceeds the smaller dimension of 7 parameters" in str(fallbacks[0].message)
    assert fallbacks[0].filename == __file__
