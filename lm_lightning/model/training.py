"""The hooks of exact training, as a ``LightningModule`` mix-in: steps, boundaries, random state, schedule.

- Each optimizer step's loss and its one collective and host sync (``lm_lightning.model.step``).
- Checkpoints that record the last optimizer-step boundary (``lm_lightning.model.boundaries``), and
  validation intervals refused when they would fall inside a step.
- A resume that restores each process's random state just before its first step, goes on from the saved
  data position, and plans the LR schedule again when its length changed (``lm_lightning.model.optim``);
  on any number of processes and with any global batch (``lm_lightning.model.elastic``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lm_lightning.model.boundaries import StepBoundary, check_epoch_fraction, check_step_boundaries
from lm_lightning.model.checkpointing import (
    RNG_KEY,
    gather_rng_states,
    rank_rng_states,
    restore_loader_position,
    set_rng_states,
)
from lm_lightning.model.elastic import fresh_seed, resume_on_this_cluster, seed_all
from lm_lightning.model.optim import replan_schedule, total_steps
from lm_lightning.model.step import StepLoss

SCHEDULE_KEY = "lm_lightning_schedule"  # the optimizer steps the LR schedule was planned over


class ExactTraining:
    """Mix-in for a ``LightningModule`` whose ``training_step`` returns ``self.step_loss.objective(...)``.

    The module calls :meth:`init_exact_training` in ``__init__``, :meth:`save_training_state` and
    :meth:`load_training_state` from its checkpoint hooks, and :meth:`plan_schedule` from
    ``configure_optimizers``; the training hooks are here. ``hparams.on_nonfinite_loss`` is ``raise`` or
    ``skip``.
    """

    def init_exact_training(self) -> None:
        """Set up the state of the hooks (call in ``__init__``)."""
        self.step_loss = StepLoss()
        self._boundary = StepBoundary()
        self._rng_states_to_restore: dict[str, Any] | None = None
        self._fresh_rng_seed: int | None = None  # a rank that the checkpoint has no random state of
        self._saved_rng_states = 0  # how many processes' random states the resumed checkpoint holds
        self._planned_steps: int | None = None  # the optimizer steps the LR schedule spans
        self._saved_schedule: dict[str, Any] | None = None  # that of a checkpoint being resumed

    def plan_schedule(self, lr_scheduler: str, warmup_ratio: float) -> None:
        """Record the length of the schedule that ``configure_optimizers`` plans (saved in checkpoints)."""
        self._planned_steps = total_steps(self.trainer, lr_scheduler, warmup_ratio)

    # ----------------------------------------------------------------------------- hooks
    def setup(self, stage: str) -> None:
        """Refuse, before any compute, a validation that would fall inside an optimizer step."""
        if stage == "fit" and self._trainer is not None:
            check_step_boundaries(self.trainer)

    def on_train_start(self) -> None:
        """A resumed fit goes on from the saved position in the epoch (see ``restore_loader_position``), on
        any number of processes (``resume_on_this_cluster``), with its LR schedule planned again from the step
        reached."""
        trainer = self.trainer
        restore_loader_position(trainer)
        resume_on_this_cluster(trainer, self._saved_rng_states, getattr(self, "model", None))
        self._saved_rng_states = 0
        if math.isfinite(trainer.num_training_batches):
            check_epoch_fraction(trainer, int(trainer.num_training_batches))
        self.step_loss.reset()
        self._boundary.reset(trainer)
        if self._saved_schedule is not None:
            replan_schedule(trainer, self._saved_schedule.get("planned_steps"), self._planned_steps)
            self._saved_schedule = None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Restore the checkpoint's random state just before the first step after a resume.

        Not at load time: the sanity-check validation and loader set-up in between may draw from it.
        """
        if self._rng_states_to_restore is not None:
            set_rng_states(self._rng_states_to_restore)
            self._rng_states_to_restore = None
        if self._fresh_rng_seed is not None:
            seed_all(self._fresh_rng_seed)
            self._fresh_rng_seed = None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Once per optimizer step, after every backward: the step's one sync, then skip, raise or log."""
        self.step_loss.finish(self, optimizer, self.hparams.get("on_nonfinite_loss", "raise"))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Keep the state at the optimizer-step boundary just reached, for later checkpoints."""
        self._boundary.capture(self.trainer)

    # ----------------------------------------------------------------------------- checkpoints
    def save_training_state(self, checkpoint: dict[str, Any]) -> None:
        """Every process's random state (dropout draws from it) and the schedule's length; a checkpoint
        written past the last step boundary records that boundary's state instead (a collective: every rank
        saves)."""
        trainer = self._trainer
        boundary_rng = self._boundary.patch(checkpoint) if self._boundary.is_passed(trainer) else None
        checkpoint[RNG_KEY] = gather_rng_states(
            trainer.world_size if trainer is not None else 1, boundary_rng
        )
        checkpoint[SCHEDULE_KEY] = {"planned_steps": self._planned_steps}

    def load_training_state(self, checkpoint: dict[str, Any]) -> None:
        """Keep this process's saved random state (or, for a rank the checkpoint has none of, a new seed) and
        the saved schedule's length until training goes on."""
        rank = self.trainer.global_rank if self._trainer is not None else 0
        saved = checkpoint.get(RNG_KEY)
        self._saved_rng_states = len(saved) if isinstance(saved, list | tuple) else int(saved is not None)
        self._rng_states_to_restore = rank_rng_states(saved, rank)
        if self._rng_states_to_restore is None and saved is not None:
            self._fresh_rng_seed = fresh_seed(rank, int(checkpoint.get("global_step", 0)))
        self._saved_schedule = checkpoint.get(SCHEDULE_KEY) or {}
