"""The contracts transformers' own GaLore and APOLLO Trainer tests check, run against our entry points
(``create_optimizer``, ``optimizer_cls_and_kwargs``): the optimizer is built, extra optim_args reach it, the
learning rate shown is the one in use with and without a scheduler, and training moves the weights.
Written here, modelled on those tests' contracts."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from tiny_lm import tiny_llama  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from subspace_optim import SubspaceAdamW  # noqa: E402
from subspace_optim.integrations.transformers import (  # noqa: E402
    create_optimizer,
    optimizer_cls_and_kwargs,
    unwrap_optimizer,
)

TARGETS = [r".*attn.*", r".*mlp.*"]  # the regex list transformers' GaLore tests use


class _Random(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}


def _model():
    return tiny_llama(hidden=32, intermediate=64, layers=1, heads=2, vocab=128, seed=0)


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        learning_rate=1e-2,
        max_steps=4,
        per_device_train_batch_size=4,
        optim="galore_adamw",
        optim_target_modules=TARGETS,
        optim_args="rank=4",
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _trainer(way, model, args):
    if way == "create_optimizer":
        prebuilt = (create_optimizer(model, args), None)
        return Trainer(model=model, args=args, train_dataset=_Random(), optimizers=prebuilt)
    factory = optimizer_cls_and_kwargs(args)
    return Trainer(model=model, args=args, train_dataset=_Random(), optimizer_cls_and_kwargs=factory)


WAYS = ["create_optimizer", "factory"]


@pytest.mark.parametrize("way", WAYS)
def test_optimizer_is_built_and_training_moves_the_weights(tmp_path, way):
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer(way, model, _args(tmp_path))
    trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)
    assert isinstance(opt, SubspaceAdamW)
    projected = [p for g in opt.param_groups if g["rank"] is not None for p in g["params"]]
    assert len(projected) == 7  # q, k, v, o, gate, up, down
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("way", WAYS)
def test_extra_optim_args_reach_the_projected_group(tmp_path, way):
    args = _args(tmp_path, optim_args="rank=4, update_proj_gap=3, scale=0.10, proj_type=reverse_std")
    trainer = _trainer(way, _model(), args)
    trainer.create_optimizer_and_scheduler(num_training_steps=4)
    (group,) = [g for g in unwrap_optimizer(trainer.optimizer).param_groups if g["rank"] is not None]
    assert (group["rank"], group["update_gap"], group["scale"], group["proj_type"]) == (4, 3, 0.10, "reverse_std")


@pytest.mark.parametrize("way", WAYS)
def test_lr_display_without_scheduler(tmp_path, way):
    trainer = _trainer(way, _model(), _args(tmp_path, lr_scheduler_type="constant"))
    trainer.create_optimizer_and_scheduler(num_training_steps=4)
    assert trainer.get_learning_rates() == [1e-2] * len(trainer.optimizer.param_groups)


@pytest.mark.parametrize("way", WAYS)
def test_lr_display_with_scheduler(tmp_path, way):
    """A linear schedule with warmup: the displayed rates follow the scheduler, in every group (the projected
    one included), step by step."""
    args = _args(tmp_path, lr_scheduler_type="linear", warmup_steps=2, max_steps=6)
    trainer = _trainer(way, _model(), args)
    trainer.create_optimizer_and_scheduler(num_training_steps=6)
    seen = []
    for _ in range(6):
        seen.append(trainer.get_learning_rates())
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    firsts = [rates[0] for rates in seen]
    assert all(len(set(rates)) == 1 for rates in seen)  # every group, projected or not, at the same rate
    assert firsts[0] == 0.0 and firsts[2] == pytest.approx(1e-2) and firsts[-1] < firsts[2]
