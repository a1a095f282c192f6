"""``transformers.TrainerCallback`` helpers shared by the Trainer and fine-tuning tests (import after
``pytest.importorskip("transformers")``)."""

from __future__ import annotations

from transformers import TrainerCallback


class StopAt(TrainerCallback):
    """Ends training after global step ``step`` (after that step's checkpoint is written): the first half of a
    checkpoint-and-resume comparison."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
