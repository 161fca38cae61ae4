"""Checkpoints on optimizer-step boundaries: after any stop, a resumed fit goes on from the step reached.

Lightning 2.6 writes ``last.ckpt`` at the end of a fit in ``ModelCheckpoint.on_train_end`` (or
``on_train_epoch_end``), after the fit loop has marked the epoch done. When the fit stopped mid-epoch (by
``max_steps``, ``max_time``, early stopping), a resume with a larger limit then starts the *next* epoch and
applies the saved loader position to it: the rest of the stopped epoch is never trained. A checkpoint
written inside an accumulation window (a time-based one, or one after a timer stopped the fit mid-window)
would hold no gradient of the window's first micro-batches and a data position past them.

:class:`StepBoundary` keeps, at the end of every optimizer step, the state a checkpoint written right then
holds (the fit loop's progress and its loader position, Lightning's own ``fit_loop.state_dict()``, and this
process's random state; the weights, optimizer and scheduler change only at a step). A checkpoint written
later at the same step, past that boundary, records that state instead: the one a ``SIGTERM`` at that step
saves, from which a resume goes on exactly. Validation and periodic checkpoints already fall on boundaries
(:func:`check_step_boundaries` refuses a validation interval that does not).
"""

from __future__ import annotations

import copy
from typing import Any

from lightning.pytorch.callbacks import GradientAccumulationScheduler

from lm_lightning.errors import RunError
from lm_lightning.model.checkpointing import collect_rng_states


class StepBoundary:
    """The training state at the last optimizer-step boundary, for checkpoints written past it."""

    def __init__(self) -> None:
        self._state: dict[str, Any] | None = None
        self._step = -1  # the optimizer step of the last boundary seen

    def capture(self, trainer: Any) -> None:
        """At the end of a micro-batch: keep the state if an optimizer step has just been made."""
        if trainer.global_step == self._step:
            return  # inside an accumulation window, or already kept
        self._step = trainer.global_step
        fit_loop = trainer.fit_loop
        progress = fit_loop.epoch_loop.batch_progress
        self._state = {
            "step": trainer.global_step,
            "marker": _marker(trainer),
            "epoch_end": progress.is_last_batch or progress.current.ready >= trainer.num_training_batches,
            "epoch": trainer.current_epoch,
            # Lightning's own loop state (progress counters and the loader's position): what a checkpoint
            # written now holds. (The loops are Lightning internals; their state_dict is what it saves.)
            "fit_loop": copy.deepcopy(fit_loop.state_dict()),
            "rng": collect_rng_states(),
        }

    def reset(self, trainer: Any) -> None:
        """A fit starts at ``trainer.global_step``: the next boundary is the end of its first step."""
        self._state, self._step = None, trainer.global_step

    def is_passed(self, trainer: Any) -> bool:
        """Whether training went past the last boundary without a new step: a micro-batch of the next
        window was drawn, or the epoch was marked done after a stop in its middle."""
        state = self._state
        if state is None or trainer is None or trainer.global_step != state["step"]:
            return False
        ready, processed = _marker(trainer)
        return ready != state["marker"][0] or (processed != state["marker"][1] and not state["epoch_end"])

    def patch(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """Make ``checkpoint`` (written past the boundary) hold the boundary's loop state and epoch; return
        this process's random state at the boundary."""
        assert self._state is not None
        checkpoint.setdefault("loops", {})["fit_loop"] = copy.deepcopy(self._state["fit_loop"])
        checkpoint["epoch"] = self._state["epoch"]
        return self._state["rng"]


def _marker(trainer: Any) -> tuple[int, int]:
    fit_loop = trainer.fit_loop
    return fit_loop.epoch_loop.batch_progress.total.ready, fit_loop.epoch_progress.total.processed


def check_step_boundaries(trainer: Any) -> None:
    """Refuse validation that would fall inside an optimizer step's accumulation window, before any compute.

    ``val_check_interval`` counts training batches (micro-batches), not optimizer steps; a validation, and the
    ``last.ckpt`` written after it, must come after the step's last micro-batch. A fraction of the epoch is
    checked once the epoch's length is known (:func:`check_epoch_fraction`).
    """
    accumulate = trainer.accumulate_grad_batches
    if any(isinstance(c, GradientAccumulationScheduler) for c in trainer.callbacks):
        raise RunError(
            "GradientAccumulationScheduler changes accumulate_grad_batches between epochs, and the training "
            "loader plans each optimizer step's rows and total from one value: set "
            "--trainer.accumulate_grad_batches instead."
        )
    if accumulate == 1:
        return
    if getattr(trainer, "_val_check_time_interval", None) is not None:  # Lightning's time-based validation
        raise RunError(
            f"A time-based --trainer.val_check_interval validates after any training batch, also inside an "
            f"optimizer step of --trainer.accumulate_grad_batches={accumulate} micro-batches: give an "
            f"integer multiple of {accumulate} (validate every N training batches, N / {accumulate} "
            "optimizer steps)."
        )
    interval = getattr(trainer, "val_check_interval", 1.0)
    if isinstance(interval, int) and interval % accumulate:
        below = interval - interval % accumulate
        fits = " or ".join(
            f"{n} (every {n // accumulate} steps)" for n in sorted({below, below + accumulate} - {0})
        )
        raise RunError(
            f"--trainer.val_check_interval={interval} counts training batches (micro-batches), and with "
            f"--trainer.accumulate_grad_batches={accumulate} it would validate (and write last.ckpt) inside "
            f"an optimizer step, before its gradient is complete. Give a multiple of {accumulate}: {fits}."
        )


def check_epoch_fraction(trainer: Any, epoch_batches: int) -> None:
    """Refuse a fractional ``val_check_interval`` that lands inside an accumulation window, or an interval
    counted across epochs (``check_val_every_n_epoch: null``) over epochs that are not whole steps."""
    accumulate = trainer.accumulate_grad_batches
    interval = getattr(trainer, "val_check_interval", 1.0)
    if accumulate == 1 or getattr(trainer, "_val_check_time_interval", None) is not None:
        return
    if isinstance(interval, float) and interval < 1.0:
        every = max(1, int(epoch_batches * interval))  # as Lightning counts it
        if every % accumulate:
            raise RunError(
                f"--trainer.val_check_interval={interval} of an epoch of {epoch_batches} training batches "
                f"validates every {every} batches, inside an optimizer step of "
                f"--trainer.accumulate_grad_batches={accumulate} micro-batches: give an integer multiple of "
                f"{accumulate} instead (validate every N training batches, N / {accumulate} optimizer steps)."
            )
    if isinstance(interval, int) and trainer.check_val_every_n_epoch is None and epoch_batches % accumulate:
        raise RunError(
            f"--trainer.val_check_interval={interval} with --trainer.check_val_every_n_epoch null counts "
            f"training batches across epochs, and an epoch of {epoch_batches} batches is not a whole number "
            f"of optimizer steps of {accumulate}: a validation would fall inside a step. Set "
            "--trainer.check_val_every_n_epoch 1 (count within each epoch)."
        )
