"""scripts/finetune.py: SubspaceAdamW under TRL's SFTTrainer and PEFT LoRA, on a tiny LLaMA (CPU, no download).

Each test trains a 1-layer, hidden-32 LLaMA for a few steps on 32-token windows of stdlib text, with a
byte-level BPE of 300 tokens trained on that text.
"""

from __future__ import annotations

import importlib.util
import os
import re
import runpy
import shutil
import warnings

import pytest
import torch
from conftest import assert_same_state

pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
from trainer_callbacks import StopAt  # noqa: E402
from transformers import Trainer  # noqa: E402

from subspace_optim import SubspaceAdamW  # noqa: E402
from subspace_optim.integrations.transformers import create_optimizer, unwrap_optimizer  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "finetune.py")
TINY = ["--max-bytes", "40000", "--hidden", "32", "--layers", "1", "--seq", "32", "--batch", "4", "--vocab", "300"]
TINY += ["--update-gap", "2", "--quiet", "--seed", "0"]


@pytest.fixture(scope="module")
def recipe() -> dict:
    """The script's functions (it is not a package module)."""
    return runpy.run_path(SCRIPT)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: one thread is much faster, and far less sensitive to other processes on the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def argv(out, *extra: str) -> list[str]:
    return [*TINY, "--output-dir", str(out), *extra]


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def optimizer_param_ids(opt: SubspaceAdamW) -> set[int]:
    return {id(p) for group in opt.param_groups for p in group["params"]}


# --------------------------------------------------------------------------- (a) SFTTrainer + LoRA via the factory


def test_sft_lora_through_the_factory_trains_exactly_the_adapters(tmp_path, recipe):
    """SFTTrainer(peft_config=..., optimizer_cls_and_kwargs=factory): the optimizer is built from the PEFT model,
    holds exactly its trainable (adapter) parameters and projects every adapter matrix; base weights are untouched
    bit for bit, every adapter matrix moves."""
    args = recipe["parse_args"](argv(tmp_path, "--lora-r", "8", "--rank", "4", "--max-steps", "4"))
    trainer = recipe["build_trainer"](args)
    assert isinstance(trainer, trl.SFTTrainer) and isinstance(trainer.model, peft.PeftModel)
    model = trainer.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable), sorted(trainable)[:4]
    # peft's "all-linear": q, k, v, o, gate, up, down of the one layer, an A and a B each
    assert len(trainable) == 14
    before = snapshot(model)

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"rank=\d+ exceeds")  # no adapter falls back to plain AdamW
        trainer.train()
    assert trainer.state.global_step == 4

    opt = unwrap_optimizer(trainer.optimizer)
    assert isinstance(opt, SubspaceAdamW)
    params = dict(model.named_parameters())
    assert optimizer_param_ids(opt) == {id(params[n]) for n in trainable}
    projected = [p for p in opt.state if "basis" in opt.state[p]]
    assert {id(p) for p in projected} == {id(params[n]) for n in trainable}  # rank 4 <= r 8: all projected
    assert all(opt.state[p]["refresh_count"] == 2 for p in projected)  # gap 2: steps 0 and 2

    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"adapter {name} did not change"
        else:
            assert torch.equal(p, before[name]), f"frozen base weight {name} changed"


# --------------------------------------------------------------------------- (b) resume


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_recipe_resume_is_exact(tmp_path, recipe, mode):
    """The recipe's SFTTrainer: 6 steps straight == 3 steps, checkpoint, a new trainer, resume, 3 steps. Weights and
    the optimizer state (bases, moments, steps, refresh counts, lr) are equal bit for bit. The checkpoint falls
    between refreshes (gap 2: steps 0, 2, 4), so the step-4 refresh starts from the restored basis."""
    extra = ["--max-steps", "6", "--warmup-steps", "1"] + (["--lora-r", "8", "--rank", "4"] if mode == "lora" else [])

    straight = recipe["build_trainer"](recipe["parse_args"](argv(tmp_path / "a", *extra)))
    straight.train()

    args = recipe["parse_args"](argv(tmp_path / "b", *extra, "--save-steps", "3"))
    first = recipe["build_trainer"](args, callbacks=[StopAt(3)])
    first.train()
    checkpoint = tmp_path / "b" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").exists()
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)  # what the Trainer does on resume
    assert any("basis" in s for s in saved["state"].values())
    assert all(s["step"] == 3 for s in saved["state"].values())

    resumed = recipe["build_trainer"](args)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6

    a, b = dict(straight.model.named_parameters()), dict(resumed.model.named_parameters())
    init = snapshot(recipe["build_trainer"](recipe["parse_args"](argv(tmp_path / "c", *extra))).model)
    trainable = [n for n, p in a.items() if p.requires_grad]
    assert all(not torch.equal(a[n], init[n]) for n in trainable), "training did not change every trainable weight"
    for name in a:
        assert torch.equal(a[name], b[name]), f"weight {name} differs after resume"

    opt_a, opt_b = unwrap_optimizer(straight.optimizer), unwrap_optimizer(resumed.optimizer)
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert len(sa["state"]) == len(trainable)
    assert_same_state(sa, sb)
    projected = [s for s in opt_b.state.values() if "basis" in s]
    assert projected and all(s["step"] == 6 and s["refresh_count"] == 3 for s in projected)


# --------------------------------------------------------------------------- (c) the script end to end


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--trainer", "trainer", "--lora-r", "8", "--moments-dtype", "int8", "--basis-dtype", "bfloat16"],
        ["--weights", "bf16"],
        pytest.param(
            ["--lora-r", "8", "--weights", "int8"],
            marks=pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao"),
        ),
    ],
    ids=["sft-full", "trainer-lora-int8", "sft-full-bf16-weights", "sft-lora-int8-weights"],
)
def test_main_end_to_end(tmp_path, recipe, extra):
    """``main(argv)``: trains, evaluates, checkpoints, saves the model (the adapter with LoRA) and a summary."""
    out = tmp_path / "run"
    summary = recipe["main"](argv(out, "--max-steps", "4", "--lr", "1e-2", *extra))
    assert summary["steps"] == 4 and summary["output_dir"] == str(out)
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert summary["optimizer_holds_exactly_the_trainable_params"]
    assert summary["projected_params"] > 0
    assert (out / "summary.json").is_file() and (out / "checkpoint-4" / "optimizer.pt").is_file()
    assert list((out / "tokenizers").glob("bpe300-*.json")), "the trained tokenizer is cached in --output-dir"
    final = out / "final"
    if "--lora-r" in extra:
        trainer = "SFTTrainer" if "--weights" in extra else "Trainer"
        assert summary["trainer"] == trainer and summary["mode"] == "lora r=8" and summary["rank"] == 8
        assert summary["trainable_params"] < summary["total_params"]
        assert (final / "adapter_model.safetensors").is_file() and (final / "adapter_config.json").is_file()
    else:
        assert summary["trainer"] == "SFTTrainer" and summary["mode"] == "full"
        assert summary["trainable_params"] == summary["total_params"]
        assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    assert (final / "tokenizer.json").is_file()


def test_int8_weights_need_lora(recipe, capsys):
    with pytest.raises(SystemExit):
        recipe["parse_args"](["--weights", "int8"])
    assert "--weights int8 needs --lora-r: transformers 5's save_pretrained writes safetensors only" in (
        capsys.readouterr().err
    )


def test_default_rank_fits_the_adapters(recipe):
    """With LoRA, --rank defaults to min(8, r): a rank above r cannot project the (r, n) / (m, r) adapters."""
    assert recipe["parse_args"](["--lora-r", "16"]).rank == 8
    assert recipe["parse_args"](["--lora-r", "4"]).rank == 4
    assert recipe["parse_args"]([]).rank == 32
    assert recipe["parse_args"](["--lora-r", "16", "--rank", "2"]).rank == 2


def test_jsonl_data(tmp_path, recipe):
    """--data accepts .jsonl with a "text" field per line; a record without one names the line."""
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c"}\n')
    train, heldout = recipe["load_documents"](str(path), 10_000)
    assert train == ["a", "b"] and heldout == ["c"]
    path.write_text('{"text": "a"}\n{"prompt": "b"}\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2: expected a JSON object with a string field 'text'"):
        recipe["load_documents"](str(path), 10_000)


# --------------------------------------------------------------------------- (d) the pre-built optimizer with PEFT


@pytest.mark.parametrize("trainer_kind", ["sft", "trainer"])
def test_prebuilt_optimizer_with_peft_is_refused(tmp_path, recipe, trainer_kind):
    """``optimizers=(create_optimizer(model, args), None)`` built before PEFT wraps the model holds only the base
    weights, which PEFT then freezes: nothing would train. The first training step must raise a ValueError that
    points to SubspaceAdamWFactory and says the trainable parameters are missing, with nothing updated.
    """
    args = recipe["parse_args"](argv(tmp_path, "--trainer", trainer_kind, "--lora-r", "8", "--max-steps", "2"))
    train_docs, _ = recipe["load_documents"](args.data, args.max_bytes)
    tok = recipe["load_tokenizer"](args, train_docs)
    model = recipe["build_model"](args, len(tok), tok)
    targs = recipe["training_arguments"](args)
    opt = create_optimizer(model, targs)  # every weight of the bare model: requires_grad is still True here
    if trainer_kind == "sft":
        from datasets import Dataset

        trainer = trl.SFTTrainer(
            model=model,
            args=targs,
            train_dataset=Dataset.from_dict({"text": train_docs}),
            processing_class=tok,
            peft_config=recipe["lora_config"](args),
            optimizers=(opt, None),
        )
    else:
        trainer = Trainer(
            model=peft.get_peft_model(model, recipe["lora_config"](args)),
            args=targs,
            train_dataset=recipe["Windows"](recipe["document_tokens"](train_docs, tok), args.seq),
            optimizers=(opt, None),
        )
    assert isinstance(trainer.model, peft.PeftModel)
    trainable = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert trainable and not trainable & optimizer_param_ids(opt)  # the mistake this test is about
    before = snapshot(trainer.model)

    with pytest.raises(ValueError) as err:
        trainer.train()
    message = str(err.value)
    assert "SubspaceAdamWFactory" in message, message
    says_missing = r"(?i)\b(no|miss\w*|not hold|none of the)\b[\w\s(),'-]*trainable|trainable[\w\s-]*missing"
    assert re.search(says_missing, message), message

    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} changed although the step was refused"
    assert all(len(s) == 0 for s in opt.state.values()), "optimizer state was created"


# --------------------------------------------------------------------------- (e) --resume, as in pretrain


def test_resume_without_a_checkpoint_starts_fresh(tmp_path, recipe, capsys):
    """--resume with no checkpoint in --output-dir starts a new run and says so in one line, as
    `subspace-optim pretrain --resume` does (it crashed with transformers' "No valid checkpoint found")."""
    out = tmp_path / "run"
    summary = recipe["main"](argv(out, "--max-steps", "2", "--resume"))
    assert summary["steps"] == 2 and summary["eval_loss_before"] is not None  # a new run: evaluated before
    lines = [line for line in capsys.readouterr().out.splitlines() if "no checkpoint" in line]
    assert lines == [f"--resume: no checkpoint found in {out}; starting a new run"]


def test_resume_refuses_a_changed_max_steps(tmp_path, recipe, capsys):
    """The cosine schedule spans --max-steps (and the default warmup is 5% of it): resuming with another value
    would bend the lr of the remaining steps, which the trainer did silently. Refused as `pretrain` refuses a
    changed --steps, before anything is built or written; the same value resumes."""
    out = tmp_path / "run"
    recipe["main"](argv(out, "--max-steps", "2", "--save-steps", "1"))
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    expected = (
        rf"cannot resume from {re.escape(str(out / 'checkpoint-2'))}: the run was started with different settings "
        r"\(checkpoint -> now: --max-steps: 2 -> 4\)\. --max-steps cannot change on resume: .*"
        r"Pass the original values, or drop --resume \(or choose another --output-dir\) to start a new run\."
    )
    with pytest.raises(ValueError, match=expected):
        recipe["main"](argv(out, "--max-steps", "4", "--resume"))
    capsys.readouterr()
    assert recipe["cli"](argv(out, "--max-steps", "4", "--resume")) == 2
    err = capsys.readouterr().err
    assert err.startswith("finetune.py: error: cannot resume from ") and "--max-steps: 2 -> 4" in err, err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == written  # nothing built, trained or written

    shutil.rmtree(out / "checkpoint-2")  # resume from step 1 with the same --max-steps: accepted
    summary = recipe["main"](argv(out, "--max-steps", "2", "--resume"))
    assert summary["steps"] == 2 and summary["eval_loss_before"] is None
