"""Numerical faults in training: a non-finite loss stops the run with a clear message, or skips the step."""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lm_lightning.model.checkpointing import newest_checkpoint

NonFiniteAction = Literal["raise", "skip"]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def nonfinite_step(trainer: Any, loss: float, where: str, action: NonFiniteAction) -> None:
    """An optimizer step whose loss is not finite on some process: raise, or say that it is skipped.

    Every process calls it with the same values (decided from the step's one gathered vector,
    ``lm_lightning.model.step``), so all of them stop, or skip the step, together: none is left waiting in a
    collective. It runs before the optimizer step, so a raise leaves the weights as they were.
    """
    if action == "skip":
        rank_zero_info(f"Skipping the optimizer step {where}: the training loss is {loss}.")
        return
    last = newest_checkpoint(trainer)
    raise NonFiniteLossError(
        f"The training loss is {loss} {where}, before the optimizer step: training stopped. "
        f"The last good checkpoint is {last or 'none (none was saved yet)'}. Lower --model.learning_rate or "
        "keep gradient clipping on (--trainer.gradient_clip_val), check the data, or set "
        "--model.on_nonfinite_loss skip to skip such steps."
    )
