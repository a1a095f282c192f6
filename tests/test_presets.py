"""Presets (``subspace_optim.presets``): valid option dicts, reached from the constructor, ``param_groups``, the
Trainer's ``optim_args`` and ``subspace-optim pretrain --preset``, always under the options a user sets."""

from __future__ import annotations

import pytest
import torch
from tiny_lm import tiny_llama

from subspace_optim import SubspaceAdamW, options, param_groups, presets


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_every_preset_is_valid_and_trains(name):
    assert set(presets.PRESETS[name]) <= set(options.DEFAULTS)
    model = tiny_llama()
    opt = SubspaceAdamW(param_groups(model, "all-linear", preset=name), lr=1e-3)
    projected = opt.param_groups[0]
    for key, value in presets.PRESETS[name].items():
        assert projected[key] == value, key
    tokens = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        opt.zero_grad()
        model(tokens, labels=tokens).loss.backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_preset_fills_only_what_a_group_does_not_set():
    model = tiny_llama()
    groups = param_groups(model, "all-linear", rank=4, moments_dtype="float32")  # explicit: kept over the preset
    opt = SubspaceAdamW(groups, lr=1e-3, residual="none", preset="least_memory")
    projected = opt.param_groups[0]
    assert projected["rank"] == 4 and projected["moments_dtype"] == "float32"
    assert projected["refresh"] == "seeded" and projected["residual"] == "apollo_tensor"  # over the keyword
    assert opt.defaults["residual"] == "none"
    plain = opt.param_groups[1]
    assert plain["rank"] is None  # param_groups' plain groups say rank=None themselves
    # param_groups: the preset's rank when none is given, 128 without a preset
    assert param_groups(model, "all-linear", preset="least_memory")[0]["rank"] == 1
    assert param_groups(model, "all-linear")[0]["rank"] == 128
    assert param_groups(model, "all-linear", preset="balanced")[0]["rank"] == 128


def test_unknown_preset_is_refused_with_the_names():
    w = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"Unknown preset 'balance'.*did you mean 'balanced'.*least_memory"):
        SubspaceAdamW([w], preset="balance")


def test_trainer_optim_args_preset_under_the_given_options():
    transformers = pytest.importorskip("transformers")
    from subspace_optim.integrations.transformers import create_optimizer

    args = transformers.TrainingArguments(
        output_dir="unused", report_to=[], optim_args="preset=least_memory, moments_dtype=float32"
    )
    opt = create_optimizer(tiny_llama(), args)
    projected = opt.param_groups[0]
    assert projected["rank"] == 1 and projected["refresh"] == "seeded" and projected["second_moment"] == "factored"
    assert projected["moments_dtype"] == "float32"  # given: over the preset


def test_pretrain_preset_replaces_the_model_file_under_the_flags():
    from subspace_optim.pretrain.config import load_config

    cfg = load_config(["--preset", "least_memory", "--moments-dtype", "bfloat16"])
    assert cfg.refresh == "seeded" and cfg.residual == "apollo_tensor" and cfg.rank == 1  # the YAML says fira, 32
    assert cfg.moments_dtype == "bfloat16"
    plain = load_config([])
    assert plain.residual == "fira" and plain.preset is None


def test_balanced_gives_the_embedding_and_head_4bit_moments_and_a_full_second_moment():
    """``balanced``: the projected matrices' first moment in 8 bits with factors, the embedding's and head's both
    moments in 4 bits (``plain_moments_dtype``, ``plain_second_moment``), from every way in."""
    from subspace_optim.pretrain import loop, optimizers
    from subspace_optim.pretrain.config import load_config

    cfg = load_config(["--preset", "balanced", "--hidden-size", "32", "--intermediate-size", "64",
                       "--num-hidden-layers", "1", "--num-attention-heads", "2"])  # fmt: skip
    assert (cfg.plain_moments_dtype, cfg.plain_second_moment) == ("int4", "full")
    model = loop.build_model(cfg, 256)
    built = optimizers.build("subspace", model, cfg)
    for opt, net in ((built, model), (None, tiny_llama(vocab=256))):
        if opt is None:
            opt = SubspaceAdamW(param_groups(net, "all-linear", rank=8, preset="balanced"), lr=1e-3)
        tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
        net(tokens, labels=tokens).loss.backward()
        opt.step()
        head = opt.state[net.get_output_embeddings().weight]
        assert head["exp_avg"].dtype == head["exp_avg_sq"].dtype == torch.int8  # 4-bit code pairs, full V
        gate = opt.state[net.model.layers[0].mlp.gate_proj.weight]
        assert gate["exp_avg"].dtype == torch.uint8 and "exp_avg_sq_row" in gate and "exp_avg_sq" not in gate
