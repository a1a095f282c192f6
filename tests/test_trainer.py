"""The HuggingFace Trainer integration, with a real Trainer on a tiny LLaMA built from a config (CPU).

Each test runs a few optimizer steps of a 2-layer, hidden-32 model on 32-byte windows of stdlib text.
"""

from __future__ import annotations

import copy
import math
import os
import runpy

import pytest
import torch
from conftest import assert_same_state

transformers = pytest.importorskip("transformers")
from tiny_lm import byte_tokens, tiny_llama  # noqa: E402
from trainer_callbacks import StopAt  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from subspace_optim import SubspaceAdamW, state_bytes  # noqa: E402
from subspace_optim.integrations.transformers import (  # noqa: E402
    SubspaceAdamWFactory,
    SubspaceMetricsCallback,
    add_metrics_callback,
    create_optimizer,
    optimizer_cls_and_kwargs,
    parse_optim_args,
    unwrap_optimizer,
)
from subspace_optim.pretrain.corpus import stdlib_text  # noqa: E402
from subspace_optim.subspace import project  # noqa: E402

SEQ = 32
LR = 1e-2
OPTIM_ARGS = "rank=4, update_proj_gap=2, scale=0.25, proj_type=std"
TARGETS = ["self_attn", "mlp"]


class Windows(torch.utils.data.Dataset):
    """Consecutive SEQ-token windows; labels are the inputs (the model shifts them)."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens
        self.n = (tokens.numel() - 1) // SEQ

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.tokens[i * SEQ : (i + 1) * SEQ]
        return {"input_ids": x, "labels": x.clone()}


@pytest.fixture(scope="module")
def dataset() -> Windows:
    return Windows(byte_tokens(stdlib_text(8_000)))


def model_from_config(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return tiny_llama(hidden=32, intermediate=64, layers=2, heads=2, max_positions=SEQ).to(dtype)


def training_args(out, **overrides) -> TrainingArguments:
    options = dict(
        output_dir=str(out),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=LR,
        lr_scheduler_type="linear",
        weight_decay=0.01,
        adam_beta1=0.8,
        adam_beta2=0.95,
        adam_epsilon=1e-7,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        optim_target_modules=TARGETS,
        optim_args=OPTIM_ARGS,
    )
    options.update(overrides)
    return TrainingArguments(**options)


def make_trainer(model, args, dataset, way: str, callbacks=()) -> Trainer:
    """A Trainer with our optimizer, given the first or the second way."""
    if way == "optimizers":
        return Trainer(
            model=model,
            args=args,
            train_dataset=dataset,
            optimizers=(create_optimizer(model, args), None),
            callbacks=list(callbacks),
        )
    assert way == "optimizer_cls_and_kwargs"
    return Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args),
        callbacks=list(callbacks),
    )


def projected_states(opt: SubspaceAdamW) -> list[dict]:
    return [s for s in opt.state.values() if "refresh_count" in s]


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize(
    "way, dtype, bf16",
    [
        ("optimizers", torch.float32, False),
        ("optimizer_cls_and_kwargs", torch.float32, False),
        ("optimizers", torch.bfloat16, True),
    ],
    ids=["optimizers", "optimizer_cls_and_kwargs", "bf16-weights"],
)
def test_resume_is_exact(tmp_path, dataset, way, dtype, bf16):
    """6 steps straight == 3 steps, checkpoint, a new Trainer, resume, 3 steps: weights and optimizer state.

    The checkpoint falls between refreshes (gap 2: steps 0, 2, 4), so the refresh after resuming starts from
    the restored basis and refresh count; the lr schedule (linear with warmup) must resume as well.
    """
    init = {k: v.clone() for k, v in model_from_config(dtype).state_dict().items()}
    common = dict(warmup_steps=1, bf16=bf16)

    straight = make_trainer(model_from_config(dtype), training_args(tmp_path / "a", **common), dataset, way)
    straight.train()

    args = training_args(tmp_path / "b", save_strategy="steps", save_steps=3, **common)
    first = make_trainer(model_from_config(dtype), args, dataset, way, callbacks=[StopAt(3)])
    first.train()
    checkpoint = tmp_path / "b" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").exists()
    # What the Trainer does on resume: the state must load with weights_only=True.
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert any("basis" in s for s in saved["state"].values())

    resumed = make_trainer(model_from_config(dtype), args, dataset, way)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a), "training did not change the weights"
    for key in a:
        assert torch.equal(a[key], b[key]), f"weight {key} differs after resume"

    opt_a, opt_b = unwrap_optimizer(straight.optimizer), unwrap_optimizer(resumed.optimizer)
    assert isinstance(opt_a, SubspaceAdamW) and isinstance(opt_b, SubspaceAdamW)
    assert_same_state(opt_a.state_dict(), opt_b.state_dict())
    states = projected_states(opt_b)
    assert len(states) == 14  # q, k, v, o, gate, up, down in 2 layers
    for s in states:
        assert s["step"] == 6 and s["refresh_count"] == 3
        assert all(s[k].dtype == torch.float32 for k in ("basis", "exp_avg", "exp_avg_sq"))


# --------------------------------------------------------------------------- accumulation, bf16, schedule


def test_accumulation_bf16_and_schedule_count_optimizer_steps(tmp_path, dataset):
    """gradient_accumulation_steps=2 under bf16 autocast: refreshes and the lr schedule follow optimizer steps."""
    model = model_from_config()
    args = training_args(tmp_path, gradient_accumulation_steps=2, bf16=True, optim_args="rank=4, update_proj_gap=2")
    trainer = make_trainer(model, args, dataset, "optimizers")
    forwards, dtypes = [], set()
    model.register_forward_pre_hook(lambda module, inputs: forwards.append(1))
    q_proj = model.model.layers[0].self_attn.q_proj
    q_proj.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
    trainer.train()

    opt = unwrap_optimizer(trainer.optimizer)
    steps, gap = args.max_steps, 2
    assert len(forwards) == steps * 2  # two micro-batches per optimizer step...
    assert dtypes == {torch.bfloat16}  # ...computed in bf16
    states = projected_states(opt)
    assert states and all(s["step"] == steps for s in states)
    assert all(s["refresh_count"] == steps // gap for s in states)  # not micro-batches // gap
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # Linear decay over 6 optimizer steps; the Trainer logs the lr each step used.
    logged = [e["learning_rate"] for e in trainer.state.log_history if "loss" in e]
    assert logged == pytest.approx([LR * (1 - k / steps) for k in range(steps)])
    assert all(g["lr"] == 0.0 and g["initial_lr"] == LR for g in opt.param_groups)


# --------------------------------------------------------------------------- grad norm and clipping


class FirstStep(TrainerCallback):
    """Snapshot of the model before the first optimizer step, and the batch it trains on."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.snapshot = None
        self.batch = None
        model.register_forward_pre_hook(self._grab, with_kwargs=True)

    def _grab(self, module, args, kwargs):
        if self.batch is None:
            self.batch = {k: v.detach().clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self.snapshot = copy.deepcopy(model)


def test_logged_grad_norm_is_full_rank_and_clipping_precedes_projection(tmp_path, dataset):
    """The logged grad_norm is the full gradient's norm (checked against an independent backward pass), and the
    optimizer receives the gradient clipped to max_grad_norm in full space, before it projects anything."""
    model = model_from_config()
    max_norm = 0.05
    args = training_args(tmp_path, max_steps=2, max_grad_norm=max_norm, optim_args="rank=2, update_proj_gap=10")
    first = FirstStep(model)
    trainer = make_trainer(model, args, dataset, "optimizers", callbacks=[first])
    opt = trainer.optimizer
    seen = []
    opt.register_step_pre_hook(
        lambda o, a, k: seen.append(
            math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters() if p.grad is not None))
        )
    )
    trainer.train()

    ref = first.snapshot
    ref.zero_grad(set_to_none=True)
    ref(**first.batch).loss.backward()
    grads = {name: p.grad.double() for name, p in ref.named_parameters()}
    full = math.sqrt(sum(float(g.square().sum()) for g in grads.values()))
    logged = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]
    assert len(logged) == 2
    assert logged[0] == pytest.approx(full, rel=1e-4)
    assert logged[0] > 10 * max_norm
    assert seen == pytest.approx([max_norm, max_norm], rel=1e-4)  # the clipped full gradient reached step()

    # Not the norm of the projected gradient, which is measurably smaller at rank 2.
    projected_sq = 0.0
    named = dict(model.named_parameters())
    for group in opt.param_groups:
        for name in group["param_names"]:
            state = opt.state[named[name]]
            g = grads[name]
            if "basis" in state:
                side = opt.subspace_metrics()["params"][name]["side"]
                projected_sq += float(project(g.float(), state["basis"], side).double().square().sum())
            else:
                projected_sq += float(g.square().sum())
    assert math.sqrt(projected_sq) < full * (1 - 1e-3)


# --------------------------------------------------------------------------- metrics callback


class Recorder(TrainerCallback):
    """Stands in for a reporting callback (tensorboard, wandb): records the logs it is given."""

    def __init__(self) -> None:
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


@pytest.mark.parametrize("placement", ["add_metrics_callback", "callbacks"])
def test_metrics_callback_reaches_logs(tmp_path, dataset, placement):
    model = model_from_config()
    args = training_args(tmp_path)
    recorder = Recorder()
    callbacks = [recorder] if placement == "add_metrics_callback" else [recorder, SubspaceMetricsCallback()]
    trainer = make_trainer(model, args, dataset, "optimizer_cls_and_kwargs", callbacks=callbacks)
    if placement == "add_metrics_callback":
        add_metrics_callback(trainer)
    trainer.train()

    opt = unwrap_optimizer(trainer.optimizer)
    train_logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(train_logs) == args.max_steps
    for entry in train_logs:
        assert 0.0 < entry["subspace/captured_energy"] <= 1.0 + 1e-6
        assert entry["subspace/refresh_time_s"] > 0.0
        assert entry["subspace/state_bytes"] == state_bytes(opt)
    # The state really is smaller than AdamW's two full-size moments.
    adamw_bytes = 2 * sum(p.numel() * p.element_size() for p in model.parameters())
    assert train_logs[-1]["subspace/state_bytes"] < adamw_bytes
    assert [e["subspace/refresh_count"] for e in train_logs] == [1, 1, 2, 2, 3, 3]
    overall = opt.subspace_metrics()["overall"]
    assert train_logs[-1]["subspace/captured_energy"] == pytest.approx(overall["captured_energy"])
    # A callback placed before ours (as reporters are) sees the values only when ours was put first.
    seen = [e for e in recorder.logs if "loss" in e]
    assert len(seen) == args.max_steps
    if placement == "add_metrics_callback":
        assert all("subspace/captured_energy" in e for e in seen)
    else:
        assert not any(k.startswith("subspace/") for e in seen for k in e)


# --------------------------------------------------------------------------- galore migration


def _hf_galore_groups(args: TrainingArguments, model: torch.nn.Module):
    """What transformers' own optim="galore_adamw" path builds for ``args``."""
    pytest.importorskip("galore_torch")
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    assert optimizer_cls.__module__.startswith("galore_torch")
    plain, target = kwargs["params"]
    return plain, target, kwargs


@pytest.mark.parametrize(
    "targets",
    [["self_attn", "mlp"], r".*\.mlp\..*_proj", [r".*\.self_attn\.[qv]_proj", "down_proj"], "all-linear"],
    ids=["substrings", "regex", "mixed-list", "all-linear"],
)
def test_galore_config_migrates_unchanged(tmp_path, targets):
    model = model_from_config()
    names = {id(p): n for n, p in model.named_parameters()}
    args = training_args(
        tmp_path,
        optim="galore_adamw",
        optim_target_modules=targets,
        optim_args="rank=8, update_proj_gap=50, scale=0.5, proj_type=reverse_std",
    )
    _, hf_target, hf_kwargs = _hf_galore_groups(args, model)
    hf_names = {names[id(p)] for p in hf_target["params"]}

    factory_cls, kwargs = optimizer_cls_and_kwargs(args)
    built = {
        "create_optimizer": create_optimizer(model, args),
        "factory": factory_cls()(model, **kwargs),  # exactly what Trainer.create_optimizer does with it
    }
    for way, opt in built.items():
        projected = [g for g in opt.param_groups if g["rank"] is not None]
        assert len(projected) == 1, way
        group = projected[0]
        ours = set(group["param_names"])
        if targets == "all-linear":
            # Deliberate difference: our "all-linear" keeps the output head in full AdamW.
            assert hf_names - ours == {"lm_head.weight"} and ours < hf_names, way
        else:
            assert ours == hf_names, way
        for ours_key, galore_key in [("rank", "rank"), ("update_gap", "update_proj_gap"), ("scale", "scale")]:
            assert group[ours_key] == hf_target[galore_key], (way, ours_key)
        assert group["proj_type"] == hf_target["proj_type"] == "reverse_std"
        # TrainingArguments' AdamW hyperparameters are honoured (transformers' galore path passes only lr).
        assert "betas" not in hf_kwargs and "eps" not in hf_kwargs and "weight_decay" not in hf_kwargs
        for g in opt.param_groups:
            assert g["lr"] == args.learning_rate and g["eps"] == args.adam_epsilon, way
            assert g["betas"] == (args.adam_beta1, args.adam_beta2), way
            params = dict(zip(g["param_names"], g["params"], strict=True))
            expected_wd = args.weight_decay if all(p.dim() >= 2 for p in params.values()) else 0.0
            assert g["weight_decay"] == expected_wd, way

    if targets == "all-linear":
        opt = create_optimizer(model, args, project_output_head=True)
        same = create_optimizer(model, training_args(tmp_path, optim_args=args.optim_args + ", project_output_head=1"))
        for o in (opt, same):
            (group,) = [g for g in o.param_groups if g["rank"] is not None]
            assert set(group["param_names"]) == hf_names


def test_galore_defaults_match_transformers(tmp_path):
    """Keys left out of optim_args get transformers' galore defaults (rank 128, gap 200, scale 0.25, std)."""
    model = tiny_llama(hidden=256, intermediate=512, layers=1, heads=4, max_positions=SEQ)
    args = training_args(tmp_path, optim="galore_adamw", optim_args=None)
    _, hf_target, _ = _hf_galore_groups(args, model)
    (group,) = [g for g in create_optimizer(model, args).param_groups if g["rank"] is not None]
    assert (group["rank"], group["update_gap"], group["scale"], group["proj_type"]) == (
        hf_target["rank"],
        hf_target["update_proj_gap"],
        hf_target["scale"],
        hf_target["proj_type"],
    )


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "optim_args, names",
    [
        ("rank=8, rnak=4", ["'rnak'", "did you mean 'rank'", "update_proj_gap"]),
        ("rank=8, momentum=0.9", ["'momentum'", "accepts"]),
        ("rank8", ["'rank8'", "key=value"]),
        ("rank=8 update_proj_gap=2", ["rank=8 update_proj_gap=2", "comma-separated"]),
        ("rank=", ["'rank='", "key=value"]),
        ("rank=eight", ["rank='eight'", "not an int", "rank=128"]),
        ("scale=big", ["scale='big'", "not a number"]),
        ("project_output_head=maybe", ["project_output_head", "true or"]),
        ("rank=8, rank=16", ["'rank' twice"]),
        ("update_proj_gap=2, update_gap=3", ["update_proj_gap", "update_gap", "keep one"]),
        ("lr=0.1", ["'lr'", "learning_rate"]),
        ("weight_decay=0.1", ["'weight_decay'", "TrainingArguments(weight_decay="]),
    ],
)
def test_bad_optim_args_name_the_key_and_the_fix(tmp_path, optim_args, names):
    with pytest.raises(ValueError) as err:
        parse_optim_args(optim_args)
    for name in names:
        assert name in str(err.value)
    # The same error from the helper that reads TrainingArguments.
    with pytest.raises(ValueError, match="optim_args"):
        create_optimizer(model_from_config(), training_args(tmp_path, optim_args=optim_args))


@pytest.mark.parametrize(
    "optim_args, names",
    [("rank=0", ["rank", "positive int"]), ("proj_type=sideways", ["proj_type", "'reverse_std'"])],
)
def test_bad_option_values_are_caught_by_the_optimizer(tmp_path, optim_args, names):
    with pytest.raises(ValueError) as err:
        create_optimizer(model_from_config(), training_args(tmp_path, optim_args=optim_args))
    for name in names:
        assert name in str(err.value)


def test_factory_rejects_unknown_kwargs_and_targets(tmp_path):
    model = model_from_config()
    with pytest.raises(ValueError, match=r"'rnak'.*did you mean 'rank'"):
        SubspaceAdamWFactory()(model, target_modules=TARGETS, rnak=8)
    with pytest.raises(ValueError, match="matched no linear layer"):
        SubspaceAdamWFactory()(model, target_modules=["attention"], rank=8)
    # How a Trainer without factory support would call it: a clear error, not a silent misconfiguration.
    with pytest.raises(TypeError, match="optimizers=\\(create_optimizer"):
        SubspaceAdamWFactory([{"params": list(model.parameters())}], rank=8)
    # The Trainer calls the factory when training starts: a typo fails there, before any step.
    args = training_args(tmp_path)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Windows(torch.arange(200) % 256),
        optimizer_cls_and_kwargs=(SubspaceAdamWFactory, {"target_modules": TARGETS, "rank": 4, "update_gap": 0}),
    )
    with pytest.raises(ValueError, match="update_gap"):
        trainer.train()


def test_parse_optim_args_types():
    assert parse_optim_args(None) == {} and parse_optim_args("  ") == {}
    assert parse_optim_args(" rank = 64 ,update_proj_gap=100, scale=0.5,proj_type=right, foreach=False,") == {
        "rank": 64,
        "update_proj_gap": 100,
        "scale": 0.5,
        "proj_type": "right",
        "foreach": False,
    }


def test_script_runs(tmp_path):
    """scripts/finetune.py --mode basic end to end, tiny: trains, checkpoints, resumes from the checkpoint."""
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "finetune.py")
    main = runpy.run_path(script)["main"]
    text = tmp_path / "corpus.txt"
    text.write_text(stdlib_text(12_000))
    out = tmp_path / "out"
    argv = ["--mode", "basic", "--text-file", str(text), "--output-dir", str(out), "--hidden", "32", "--layers", "1"]
    argv += ["--seq", "32", "--batch", "2", "--save-steps", "2", "--optim-args", "rank=4, update_proj_gap=2"]
    first = main([*argv, "--max-steps", "4"])
    assert first["steps"] == 4 and (out / "checkpoint-4" / "optimizer.pt").exists()
    assert first["eval_loss_after"] < first["eval_loss_before"]
    assert first["optimizer_state_mib"] < first["adamw_state_mib"]
    second = main([*argv, "--max-steps", "6", "--resume", "--way", "factory"])
    assert second["steps"] == 6 and (out / "checkpoint-6" / "optimizer.pt").exists()


def test_build_options_are_the_constructor_keywords_only():
    """The accepted option names come from SubspaceAdamW's signature: its **unexpected catch-all is not one."""
    from subspace_optim.integrations.transformers import build_optimizer

    model = tiny_llama(hidden=16, intermediate=24, layers=1, heads=2)
    with pytest.raises(ValueError, match=r"Unknown SubspaceAdamW option 'unexpected'; accepted: ") as err:
        build_optimizer(model, rank=4, unexpected=1)
    assert "unexpected," not in str(err.value) and "matmul_precision" in str(err.value)


def test_optim_args_select_low_precision_state():
    """moments_dtype and basis_dtype come from the option table into optim_args, and reach every group (the
    plain embedding's 8-bit state included)."""
    assert parse_optim_args("rank=8, moments_dtype=int8, basis_dtype=bfloat16") == {
        "rank": 8,
        "moments_dtype": "int8",
        "basis_dtype": "bfloat16",
    }
    model = tiny_llama(hidden=32, intermediate=64, layers=1, heads=2, vocab=256, seed=0)
    args = TrainingArguments(
        output_dir="unused", optim_args="rank=8, moments_dtype=int8, basis_dtype=bfloat16", report_to=[]
    )
    opt = create_optimizer(model, args)
    assert {g["moments_dtype"] for g in opt.param_groups} == {"int8"}
    assert {g["basis_dtype"] for g in opt.param_groups} == {"bfloat16"}


def test_optim_args_give_the_plain_parameters_their_own_storage():
    """plain_moments_dtype / plain_second_moment from optim_args ("none": follow the projected ones) reach every
    group, and the embedding's state is 4-bit with a full V under a factored projected one."""
    parsed = parse_optim_args("rank=8, second_moment=factored, plain_moments_dtype=int4, plain_second_moment=full")
    assert parsed["plain_moments_dtype"] == "int4" and parsed["plain_second_moment"] == "full"
    assert parse_optim_args("plain_second_moment=none") == {"plain_second_moment": None}
    model = tiny_llama(hidden=32, intermediate=64, layers=1, heads=2, vocab=256, seed=0)
    args = TrainingArguments(
        output_dir="unused",
        optim_args="rank=8, second_moment=factored, plain_moments_dtype=int4, plain_second_moment=full",
        report_to=[],
    )
    opt = create_optimizer(model, args)
    assert {g["plain_moments_dtype"] for g in opt.param_groups} == {"int4"}
    embedding = model.get_input_embeddings().weight
    model(torch.randint(0, 256, (2, 8)), labels=torch.randint(0, 256, (2, 8))).loss.backward()
    opt.step()
    state = opt.state[embedding]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.int8  # 4-bit code pairs, full V


# --------------------------------------------------------------------------- layer-wise updates


def test_layerwise_trainer_with_accumulation_equals_regular_and_resumes_exactly(tmp_path, dataset):
    """optim_args 'layerwise=true' with gradient_accumulation_steps=2: the same weights as regular stepping
    (clipping off, where the two must agree), and 3 steps + checkpoint + resume + 3 steps == 6 straight."""
    common = dict(gradient_accumulation_steps=2, max_grad_norm=0.0, warmup_steps=1)
    layerwise = dict(optim_args=OPTIM_ARGS + ", layerwise=true", **common)
    way = "optimizer_cls_and_kwargs"
    regular = make_trainer(model_from_config(), training_args(tmp_path / "r", **common), dataset, way)
    regular.train()
    straight = make_trainer(model_from_config(), training_args(tmp_path / "a", **layerwise), dataset, way)
    straight.train()
    assert unwrap_optimizer(straight.optimizer)._backward_update is not None
    a, r = straight.model.state_dict(), regular.model.state_dict()
    for key in a:
        assert torch.equal(a[key], r[key]), f"layer-wise weight {key} differs from regular stepping"

    args = training_args(tmp_path / "b", save_strategy="steps", save_steps=3, **layerwise)
    make_trainer(model_from_config(), args, dataset, way, callbacks=[StopAt(3)]).train()
    resumed = make_trainer(model_from_config(), args, dataset, way)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    b = resumed.model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), f"weight {key} differs after a layer-wise resume"
    assert all(s["step"] == 6 for s in projected_states(unwrap_optimizer(resumed.optimizer)))


def test_layerwise_trainer_clips_inside_backward_and_logs_the_norm(tmp_path, dataset):
    """max_grad_norm reaches the layer-wise clipping (it changes the weights) and its norm reaches the logs."""
    recorder = Recorder()
    runs = {}
    for clip in (0.0, 0.05):
        args = training_args(tmp_path / str(clip), optim_args=OPTIM_ARGS + ", layerwise=true", max_grad_norm=clip)
        trainer = make_trainer(model_from_config(), args, dataset, "optimizers", callbacks=[recorder])
        add_metrics_callback(trainer)
        trainer.train()
        runs[clip] = trainer.model.state_dict()
        handle = unwrap_optimizer(trainer.optimizer)._backward_update
        assert handle.max_grad_norm == (0.05 if clip else None)
    assert any(not torch.equal(runs[0.0][k], runs[0.05][k]) for k in runs[0.0])
    assert any("subspace/grad_norm" in logs and logs["subspace/grad_norm"] > 0.05 for logs in recorder.logs)


def test_layerwise_options_need_layerwise(tmp_path):
    from subspace_optim.integrations.transformers import build_optimizer

    model = tiny_llama(hidden=16, intermediate=24, layers=1, heads=2)
    with pytest.raises(ValueError, match=r"\['accumulation_steps'\] configure layer-wise updates"):
        build_optimizer(model, rank=4, accumulation_steps=2)
    with pytest.raises(ValueError, match="set TrainingArguments\\(gradient_accumulation_steps=...\\)"):
        parse_optim_args("accumulation_steps=2")
    args = TrainingArguments(
        output_dir=str(tmp_path),
        optim="galore_adamw_layerwise",
        optim_args="rank=4",
        gradient_accumulation_steps=3,
        report_to=[],
    )
    assert create_optimizer(model, args)._backward_update.accumulation_steps == 3
