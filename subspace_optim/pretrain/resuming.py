"""The ``--resume`` rules ``subspace-optim pretrain`` and ``scripts/finetune.py`` share, written once so the two
tools agree: with no checkpoint, ``--resume`` starts a new run and says so in one line (a job script can pass it from
its first launch on); a checkpoint of a run of another length is refused, because the warmup + cosine schedule spans
the run and another length would change the learning rate of the remaining steps.
"""

from __future__ import annotations

from os import PathLike


class ResumeMismatch(ValueError):
    """A checkpoint written with other settings than the run resuming from it (the message names each one)."""


def no_checkpoint(where: str | PathLike[str]) -> str:
    """The line printed when ``--resume`` finds no checkpoint in ``where``: the run starts fresh instead."""
    return f"--resume: no checkpoint found in {where}; starting a new run"


def length_note(flag: str) -> str:
    """Why ``flag``, the run's length in steps, cannot change on resume."""
    return (
        f"{flag} cannot change on resume: the warmup + cosine schedule spans {flag}, so another value would change "
        "the learning rate of the remaining steps (to train longer, start a new run)."
    )


def mismatch(where: str | PathLike[str], diffs: list[str], notes: str = "") -> ResumeMismatch:
    """The refusal to resume from ``where``: each ``diffs`` entry is ``flag: checkpoint value -> new value``."""
    return ResumeMismatch(
        f"cannot resume from {where}: the run was started with different settings (checkpoint -> now: "
        f"{'; '.join(diffs)}).{notes} Pass the original values, or drop --resume (or choose another "
        "--output-dir) to start a new run."
    )


def check_length(where: str | PathLike[str], flag: str, saved: int, current: int) -> None:
    """Raise ``ResumeMismatch`` if the checkpoint at ``where`` is of a run of ``saved`` steps, not ``current``."""
    if saved != current:
        raise mismatch(where, [f"{flag}: {saved!r} -> {current!r}"], " " + length_note(flag))
