"""Drop-in footguns a new user hits: each one is now a clear error, or a warning that says
what happens and how to get what was meant, or documented behaviour."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn

from subspace_optim import SubspaceAdamW, param_groups


class TinyLM(nn.Module):
    """An embedding, one projected-worthy linear layer, a norm and an untied output head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(40, 16)
        self.proj = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 40, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(torch.relu(self.proj(self.embed_tokens(ids)))))


def _loss(model: nn.Module) -> torch.Tensor:
    ids = torch.arange(12).remainder(40).view(3, 4)
    return model(ids).logsumexp(-1).mean()


def _w(*shape: int, seed: int = 0) -> nn.Parameter:
    torch.manual_seed(seed)
    return nn.Parameter(torch.randn(*shape))


def _ours(caught: list[warnings.WarningMessage], text: str) -> list[warnings.WarningMessage]:
    return [w for w in caught if text in str(w.message)]


# ------------------------------------------------------------------------------ 1. top-level rank, flat params
@pytest.mark.parametrize("how", ["parameters", "named_parameters", "list(named_parameters)"])
def test_top_level_rank_on_a_whole_model_warns_that_embeddings_and_head_are_projected(how):
    model = TinyLM()
    params = {
        "parameters": lambda: model.parameters(),
        "named_parameters": lambda: model.named_parameters(),
        "list(named_parameters)": lambda: list(model.named_parameters()),
    }[how]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = SubspaceAdamW(params, rank=4)
    found = _ours(caught, "embedding")
    assert len(found) == 1, [str(w.message) for w in caught]
    message = str(found[0].message)
    assert found[0].category is UserWarning and found[0].filename == __file__
    assert "embed_tokens.weight" in message and "lm_head.weight" in message
    assert "subspace_optim.param_groups(model" in message
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_no_embedding_warning_for_explicit_groups_or_hand_picked_matrices():
    model = TinyLM()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SubspaceAdamW(param_groups(model, ["proj"], rank=4))
        SubspaceAdamW([{"params": model.parameters(), "rank": 4}])  # a group: the user chose its members
        SubspaceAdamW([model.proj.weight], rank=4)  # nothing recognisable as an embedding or head
        SubspaceAdamW(TinyLM().parameters())  # no rank: nothing is projected (item 2 warns at the step)
        SubspaceAdamW(model.parameters(), rank=64)  # rank above every dimension: nothing is projected
    assert not _ours(caught, "embedding"), [str(w.message) for w in caught]


# ------------------------------------------------------------------------------ 2. no rank anywhere
def test_no_rank_anywhere_warns_once_that_this_is_plain_adamw():
    model = TinyLM()
    opt = SubspaceAdamW(model.parameters(), lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            _loss(model).backward()
            opt.step()
            opt.zero_grad()
    found = _ours(caught, "no param group has a rank")
    assert len(found) == 1, [str(w.message) for w in caught]
    message = str(found[0].message)
    assert "plain AdamW" in message and "rank=" in message and "param_groups(model" in message
    assert found[0].filename == __file__


def test_no_plain_adamw_warning_when_a_group_projects_or_says_rank_none():
    model = TinyLM()
    explicit = SubspaceAdamW([{"params": model.parameters(), "rank": None}])  # plain on purpose
    late = SubspaceAdamW([{"params": [model.norm.weight, model.norm.bias]}])
    late.add_param_group({"params": [model.proj.weight], "rank": 4})  # a rank group added before the first step
    projected = SubspaceAdamW(param_groups(model, ["proj"], rank=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for opt in (explicit, late, projected):
            _loss(model).backward()
            opt.step()
            opt.zero_grad()
    assert not _ours(caught, "no param group has a rank"), [str(w.message) for w in caught]


# ------------------------------------------------------------------------------ 3. a model instead of parameters
@pytest.mark.parametrize("model", [TinyLM(), nn.Sequential(nn.Linear(4, 4))], ids=["module", "sequential"])
def test_a_model_instead_of_its_parameters_names_the_fix(model):
    with pytest.raises(TypeError) as err:
        SubspaceAdamW(model, rank=4)
    message = str(err.value)
    assert type(model).__name__ in message
    assert "model.parameters()" in message and "subspace_optim.param_groups(model" in message


# ------------------------------------------------------------------------------ 4. param group key typos
def test_param_group_key_typo_is_an_error_with_the_likely_key():
    w, v = _w(6, 5), _w(5, seed=1)
    with pytest.raises(ValueError, match=r"param group 1 .*'rnak' \(did you mean 'rank'\?\)"):
        SubspaceAdamW([{"params": [v]}, {"params": [w], "rnak": 16}])
    opt = SubspaceAdamW([{"params": [v]}])
    with pytest.raises(ValueError, match=r"'update_gp' \(did you mean 'update_gap'\?\)"):
        opt.add_param_group({"params": [w], "rank": 2, "update_gp": 10})
    assert len(opt.param_groups) == 1  # nothing was added
    with pytest.raises(ValueError, match=r"param group 0 .*'momentum'"):
        SubspaceAdamW([{"params": [w], "momentum": 0.9}])


def test_constructor_keyword_typo_suggests_the_option():
    with pytest.raises(TypeError, match=r"rnak.*did you mean 'rank'\?"):
        SubspaceAdamW([_w(4, 4)], rnak=2)


def test_keys_that_torch_schedulers_and_loggers_put_into_groups_are_accepted():
    """A group copied from a live optimizer carries the keys torch's lr schedulers add (initial_lr, OneCycleLR's
    max_lr/min_lr/max_momentum/base_momentum, SWALR's swa_lr); named params carry param_names; 'name' labels
    groups for loggers. torch.optim.AdamW's own flags are accepted at the values that describe this optimizer."""
    w, v = _w(6, 5), _w(5, seed=1)
    first = SubspaceAdamW([{"params": [w], "rank": 2, "name": "attn"}, {"params": [v], "name": "norms"}], lr=1e-2)
    torch.optim.lr_scheduler.OneCycleLR(first, max_lr=1e-2, total_steps=10)
    torch.optim.swa_utils.SWALR(first, swa_lr=1e-3)
    assert {"initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum", "swa_lr"} <= set(first.param_groups[0])
    second = SubspaceAdamW([dict(g) for g in first.param_groups])
    assert second.param_groups[0]["name"] == "attn" and second.param_groups[0]["rank"] == 2
    SubspaceAdamW([{"params": [("w", w)], "rank": 2}, {"params": [("v", v)]}])  # param_names
    SubspaceAdamW(torch.optim.AdamW([w, v], weight_decay=0.0).param_groups)  # AdamW's defaults: plain AdamW
    with pytest.raises(ValueError, match=r"maximize=True.*SubspaceAdamW"):
        SubspaceAdamW([{"params": [w], "maximize": True}])


# ------------------------------------------------------------------------------ 5. shape options changed live
def _two_groups():
    w, w2, v, m = _w(6, 5), _w(7, 4, seed=1), _w(5, seed=2), _w(5, 3, seed=3)
    opt = SubspaceAdamW([{"params": [v, m]}, {"params": [w, w2], "rank": 2, "update_gap": 2}], lr=1e-2)
    params = [v, m, w, w2]
    return opt, params


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


@pytest.mark.parametrize(
    "group, key, new, pattern",
    [
        (1, "rank", 3, r"param group 1 changed rank from 2 to 3"),
        (1, "proj_type", "left", r"param group 1 changed proj_type from 'std' to 'left'"),
        (1, "rank", None, r"param group 1 changed rank from 2 to None"),
        (1, "rank", 6, r"param group 1 changed rank from 2 to 6"),  # above min(7, 4): plain AdamW would take it
        (0, "rank", 2, r"param group 0 changed rank from None to 2"),  # its matrix holds plain AdamW state
    ],
)
def test_changing_a_shape_option_of_a_live_group_is_refused_before_anything_moves(group, key, new, pattern):
    opt, params = _two_groups()
    _grads(params, 0)
    opt.step()
    opt.param_groups[group][key] = new
    _grads(params, 1)
    snap = snapshot(opt, params)
    with pytest.raises(ValueError, match=pattern) as err:
        opt.step()
    message = str(err.value)
    assert "Nothing was changed" in message and "new SubspaceAdamW" in message and "load" in message
    assert_unchanged(opt, params, snap)  # the plain group 0 did not step either: all or nothing
    old = {"rank": 2 if group == 1 else None, "proj_type": "std"}[key]
    opt.param_groups[group][key] = old  # setting it back is the other fix
    opt.step()
    assert not torch.equal(params[2], snap[1][2])


def test_shape_options_may_change_while_they_reshape_no_state():
    opt, params = _two_groups()
    opt.param_groups[1]["rank"] = 3  # before the first step: no state yet
    _grads(params, 0)
    opt.step()
    assert opt.state[params[2]]["exp_avg"].shape == (6, 3)
    opt.param_groups[1]["proj_type"] = "right"  # std already chose the right side for both matrices
    opt.param_groups[0]["rank"] = 8  # above every dimension of group 0: it stays plain AdamW
    _grads(params, 1)
    opt.step()


def test_a_loaded_optimizer_refuses_a_changed_rank_too():
    opt, params = _two_groups()
    _grads(params, 0)
    opt.step()
    fresh = SubspaceAdamW([{"params": params[:2]}, {"params": params[2:], "rank": 2}], lr=1e-2)
    fresh.load_state_dict(opt.state_dict())
    fresh.param_groups[1]["rank"] = 3
    _grads(params, 1)
    with pytest.raises(ValueError, match=r"param group 1 changed rank from 2 to 3"):
        fresh.step()


def test_storage_options_may_change_on_a_live_group():
    """moments_dtype, basis_dtype and residual reshape nothing: the state is converted at the next step."""
    opt, params = _two_groups()
    _grads(params, 0)
    opt.step()
    group = opt.param_groups[1]
    group.update(moments_dtype="bfloat16", basis_dtype="bfloat16", residual="fira")
    _grads(params, 1)
    opt.step()
    state = opt.state[params[2]]
    assert state["exp_avg"].dtype == torch.bfloat16 and state["basis"].dtype == torch.bfloat16
    assert "update_norm" in state


# ------------------------------------------------------------------------------ 6. torch dtypes as options
def test_torch_dtypes_are_accepted_and_stored_as_option_strings():
    w, w2, v = _w(6, 5), _w(7, 4, seed=1), _w(5, seed=2)
    opt = SubspaceAdamW(
        [{"params": [w, v], "rank": 2}, {"params": [w2], "rank": 2, "moments_dtype": torch.int8}],
        moments_dtype=torch.bfloat16,
        basis_dtype=torch.bfloat16,
    )
    opt.add_param_group({"params": [_w(4, 4, seed=3)], "basis_dtype": torch.float32, "moments_dtype": torch.float})
    assert opt.defaults["moments_dtype"] == "bfloat16" and opt.defaults["basis_dtype"] == "bfloat16"
    assert [g["moments_dtype"] for g in opt.param_groups] == ["bfloat16", "int8", "float32"]
    assert [g["basis_dtype"] for g in opt.param_groups] == ["bfloat16", "bfloat16", "float32"]
    _grads([w, w2, v], 0)
    opt.step()
    assert opt.state[w]["exp_avg"].dtype == torch.bfloat16 and opt.state[w]["basis"].dtype == torch.bfloat16
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    for group in loaded["param_groups"]:
        assert all(not isinstance(v, torch.dtype) for v in group.values()), group
    with pytest.raises(ValueError, match=r"Invalid moments_dtype: torch.float16 .*'float32', 'bfloat16', 'int8'"):
        SubspaceAdamW([w], moments_dtype=torch.float16)
    with pytest.raises(ValueError, match=r"Invalid basis_dtype: torch.float16 in param group 0"):
        SubspaceAdamW([{"params": [w], "basis_dtype": torch.float16}])
    assert SubspaceAdamW([{"params": [w], "basis_dtype": torch.int8}]).param_groups[0]["basis_dtype"] == "int8"


# ------------------------------------------------------------------------------ 9. metrics through accelerate
def test_subspace_metrics_reach_through_accelerates_wrapper():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.optimizer import AcceleratedOptimizer

    from subspace_optim.metrics import subspace_metrics

    accelerate.Accelerator(cpu=True)
    w = _w(6, 5)
    opt = SubspaceAdamW([w], rank=2)
    wrapped = AcceleratedOptimizer(opt, device_placement=False)
    w.grad = torch.randn(6, 5)
    wrapped.step()
    assert subspace_metrics(wrapped) == opt.subspace_metrics()
    assert subspace_metrics(opt)["overall"]["projected_params"] == 1
    with pytest.raises(TypeError, match=r"subspace_metrics needs a SubspaceAdamW.*AdamW"):
        subspace_metrics(torch.optim.AdamW([w]))


# ------------------------------------------------------------------------------ 7. the Trainer factory's lr
def _llama():
    from tiny_lm import tiny_llama

    return tiny_llama(hidden=32, intermediate=64, layers=1, heads=2, vocab=256, seed=0)


def test_trainer_factory_without_lr_takes_the_training_arguments():
    transformers = pytest.importorskip("transformers")
    from subspace_optim.integrations.transformers import SubspaceAdamWFactory, unwrap_optimizer

    args = transformers.TrainingArguments(
        output_dir="unused",
        learning_rate=3e-2,
        adam_beta1=0.8,
        adam_beta2=0.95,
        adam_epsilon=1e-7,
        weight_decay=0.01,
        report_to=[],
        use_cpu=True,
    )
    kwargs = {"target_modules": ["self_attn", "mlp"], "rank": 4}
    trainer = transformers.Trainer(model=_llama(), args=args, optimizer_cls_and_kwargs=(SubspaceAdamWFactory, kwargs))
    opt = unwrap_optimizer(trainer.create_optimizer())
    for group in opt.param_groups:
        assert group["lr"] == 3e-2 and group["betas"] == (0.8, 0.95) and group["eps"] == 1e-7
    assert {g["weight_decay"] for g in opt.param_groups} == {0.01, 0.0}  # 1-D parameters: no decay
    # A value given in the kwargs wins over TrainingArguments.
    trainer = transformers.Trainer(
        model=_llama(), args=args, optimizer_cls_and_kwargs=(SubspaceAdamWFactory, {**kwargs, "lr": 5e-3})
    )
    assert {g["lr"] for g in unwrap_optimizer(trainer.create_optimizer()).param_groups} == {5e-3}


def test_factory_called_outside_a_trainer_without_lr_warns():
    pytest.importorskip("transformers")
    from subspace_optim.integrations.transformers import SubspaceAdamWFactory

    with pytest.warns(UserWarning, match=r"no lr.*lr=0\.001.*learning_rate"):
        opt = SubspaceAdamWFactory()(_llama(), target_modules=["self_attn"], rank=4)
    assert {g["lr"] for g in opt.param_groups} == {1e-3}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SubspaceAdamWFactory()(_llama(), target_modules=["self_attn"], rank=4, lr=1e-2)


# ------------------------------------------------------------------------------ 8. optim_args coverage
def test_optim_args_take_the_storage_residual_plain_lr_and_layerwise_options():
    transformers = pytest.importorskip("transformers")
    from subspace_optim.integrations.transformers import create_optimizer, parse_optim_args

    text = "rank=4, moments_dtype=int8, basis_dtype=bfloat16, residual=fira, plain_lr=3e-3, layerwise=true"
    assert parse_optim_args(text) == {
        "rank": 4,
        "moments_dtype": "int8",
        "basis_dtype": "bfloat16",
        "residual": "fira",
        "plain_lr": 3e-3,
        "layerwise": True,
    }
    # Options whose value may be None take the word none (any case).
    assert parse_optim_args("plain_lr=none, foreach=None") == {"plain_lr": None, "foreach": None}
    args = transformers.TrainingArguments(output_dir="unused", optim_args=text, report_to=[], use_cpu=True)
    opt = create_optimizer(_llama(), args)
    assert {(g["moments_dtype"], g["basis_dtype"], g["residual"], g["plain_lr"]) for g in opt.param_groups} == {
        ("int8", "bfloat16", "fira", 3e-3)
    }
    assert opt._backward_update is not None
    with pytest.raises(ValueError, match=r"plain_lr='fast' is not a number.*plain_lr=3e-3 or plain_lr=none"):
        parse_optim_args("plain_lr=fast")
