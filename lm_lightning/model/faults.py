"""Numerical faults in training: a non-finite loss stops the run with a clear message, or skips the batch."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from lm_lightning.model.checkpointing import newest_checkpoint

NonFiniteAction = Literal["raise", "skip"]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def nonfinite_loss(module: Any, loss: Tensor, batch_idx: int, action: NonFiniteAction) -> Tensor | None:
    """``None`` when the loss is finite on every process; otherwise raise, or return a zero loss to skip.

    Every process takes the same decision (the flag is gathered), so under DDP all of them skip or stop
    together and none waits for the others in a collective. The zero loss still reaches every parameter,
    so DDP's gradient all-reduce runs as usual; the caller then drops the gradients before the optimizer
    step, so neither the weights nor the optimizer's moments change.
    """
    bad = (~torch.isfinite(loss.detach())).to(torch.int32)
    trainer = module._trainer
    if trainer is not None and trainer.world_size > 1:
        bad = module.all_gather(bad).max()
    if not bad.item():
        return None
    step = trainer.global_step if trainer is not None else None
    epoch = trainer.current_epoch if trainer is not None else None
    where = f"at step {step} (epoch {epoch}, batch {batch_idx})"
    if action == "skip":
        if trainer is not None and trainer.is_global_zero:
            print(f"Skipping the batch {where}: the training loss is {loss.item()}.")
        return sum(p.sum() for p in module.parameters() if p.requires_grad) * 0.0
    last = newest_checkpoint(trainer) if trainer is not None else None
    raise NonFiniteLossError(
        f"The training loss is {loss.item()} {where}, before the optimizer step: training stopped. "
        f"The last good checkpoint is {last or 'none (none was saved yet)'}. Lower --model.learning_rate or "
        "keep gradient clipping on (--trainer.gradient_clip_val), check the data, or set "
        "--model.on_nonfinite_loss skip to skip such batches."
    )
