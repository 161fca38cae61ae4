"""A resume on another number of processes or another global batch: what it keeps and changes, said.

What the checkpoint holds, and what a resume on ``W'`` processes (any number) does with it:

- **The data position** is global (``lm_lightning.data.global_batches``): the seed, the epoch and the samples
  of the epoch's order consumed. The resume goes on from the next sample of the same order, on any number of
  processes: nothing is repeated or skipped.
- **The global batch** (``batch_size x accumulate_grad_batches x processes``) is the unit of a step. When it
  changes, the position in samples is kept and the step count follows: the optimizer steps made so far stay
  counted (``global_step``, the LR schedule's position), and each step from there takes the new global batch,
  so the number of steps left in the epoch follows from the samples left. Lightning's loop counts the
  micro-batches of the epoch (``batch_progress``); they are set to the count the new batch sizes give at that
  sample (:func:`align_loop_counters`), so that its optimizer steps, validations and the epoch's end fall
  where the loader's steps do.
- **Random states** (dropout draws from them): each process's is saved. Ranks that the checkpoint has restore
  their own; ranks it has not draw new ones (:func:`fresh_seed`: from the seed, the step and the rank); the
  states of ranks the resumed run does not have are not used. With dropout on, a run on another number of
  processes is not the run it would have been: each sample's mask is drawn by another process's stream.

Each resume says where the data goes on from; a change of the number of processes or of the global batch is
said in full, once, on rank 0.
"""

from __future__ import annotations

import math
import os
import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lm_lightning.data.global_batches import GlobalBatchSampler, Resumed


# ----------------------------------------------------------------------------- random states
def fresh_seed(rank: int, step: int) -> int:
    """The seed of a rank that has no saved random state: from the run's seed, the step and the rank."""
    base = int(os.environ.get("PL_GLOBAL_SEED", 0))  # what seed_everything set (0 when it was not called)
    return int(np.random.SeedSequence([base, step, rank]).generate_state(1)[0])


def seed_all(seed: int) -> None:
    """Seed every generator that training draws from on this process (torch, CUDA, NumPy, Python)."""
    torch.manual_seed(seed)  # also every CUDA device's
    np.random.seed(seed)
    random.seed(seed)


def rng_report(saved: int, world_size: int, dropout: float) -> str | None:
    """What a resume does with ``saved`` processes' random states on ``world_size`` processes (None: the same
    number, each restores its own)."""
    if saved == world_size or saved == 0:
        return None
    kept = min(saved, world_size)
    parts = [f"ranks 0-{kept - 1} restore their own" if kept > 1 else "rank 0 restores its own"]
    if saved > world_size:
        unused = f"rank {world_size}" if saved - world_size == 1 else f"ranks {world_size}-{saved - 1}"
        parts.append(f"the saved states of {unused} are not used")
    else:
        new = (
            f"rank {saved} had none and draws a new one"
            if world_size - saved == 1
            else f"ranks {saved}-{world_size - 1} had none and draw new ones"
        )
        parts.append(f"{new} (seeded from the run's seed, the step and the rank)")
    effect = (
        f"Dropout is on (largest p = {dropout:g}): a run resumed on {world_size} process(es) differs from "
        f"one that stays on {saved}, as each sample's dropout mask comes from another process's stream."
        if dropout > 0
        else "Dropout is off in this model: the random states do not change the training."
    )
    holds = f"{saved} process{'es' if saved != 1 else ''}"
    return f"Random states: the checkpoint holds the states of {holds}; {'; '.join(parts)}. {effect}"


def largest_dropout(model: nn.Module | None) -> float:
    """The largest dropout probability of ``model``'s ``Dropout`` modules and attention (0.0: none)."""
    if model is None:
        return 0.0
    probabilities = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    config = getattr(model, "config", None)
    probabilities.append(float(getattr(config, "attention_dropout", 0.0) or 0.0))
    return max(probabilities)


# ----------------------------------------------------------------------------- the data position
def train_sampler(trainer: Any) -> GlobalBatchSampler | None:
    """The training loader's :class:`GlobalBatchSampler`, once the fit loop has set the loader up."""
    loaders = trainer.train_dataloader  # set up by the fit loop before on_train_start (None before)
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    for loader in loaders if isinstance(loaders, list | tuple) else [loaders]:
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, GlobalBatchSampler):
            return sampler
    return None


def align_loop_counters(trainer: Any, resumed: Resumed) -> int:
    """Set Lightning's count of the epoch's micro-batches to the loader's at the resumed position; the change.

    Lightning steps the optimizer when that count is a multiple of ``accumulate_grad_batches`` and ends the
    epoch when it reaches the loader's length: both must fall where the loader's steps do. Every counter
    (``ready``, ``started``, ``processed``, ``completed``, this epoch's and the total) moves by the same
    amount, so Lightning's own restart logic reads them as it would have. Unchanged with the same batch
    sizes; ``global_step`` and the epoch are never changed.
    """
    progress = trainer.fit_loop.epoch_loop.batch_progress
    if resumed.state["epoch"] != trainer.current_epoch or not trainer.fit_loop.restarting:
        return 0
    delta = resumed.batches_done - progress.current.ready
    if delta:
        for counter in (progress.current, progress.total):
            counter.ready += delta
            counter.started += delta
            counter.processed += delta
            counter.completed += delta
    return delta


def position_report(resumed: Resumed, step: int) -> tuple[str, str | None]:
    """The resume's line on the data position, and the warning on a change of the global batch (or None)."""
    state = resumed.state
    world_size, batch_size, accumulate = resumed.split
    before = (state["world_size"], state["batch_size"], state["accumulate"])

    def split(w: int, b: int, a: int) -> str:
        return f"{w} process{'es' if w != 1 else ''} x batch {b} x accumulate {a}"

    consumed, rows, epoch = int(state["consumed"]), int(state["num_rows"]), int(state["epoch"])
    info = (
        f"Resuming the training data at sample {consumed} of {rows} of epoch {epoch}'s order (seed "
        f"{state['seed']}), the next one after those the checkpoint's steps trained; written by "
        f"{split(*before)}, resumed on {split(world_size, batch_size, accumulate)}."
    )
    old, new = int(state["global_batch"]), resumed.global_batch
    if old == new:
        return info + " The same global batch: the same samples in the same steps.", None
    first = ""
    if consumed % new and consumed < rows:
        up_to = min((consumed // new + 1) * new, rows)
        first = (
            f" The first step from here takes the {up_to - consumed} samples up to sample {up_to}, where the "
            f"steps of {new} start in this epoch's order."
        )
    now = split(world_size, batch_size, accumulate)
    steps_left = math.ceil(max(rows - consumed, 0) / new)
    warning = (
        f"The global batch changes from {old} ({split(*before)}) to {new} ({now}). The resume keeps the "
        f"position in samples (sample {consumed} of epoch {epoch}) and the {step} optimizer steps made "
        f"(global_step, the learning-rate schedule's position); the step count follows: each step from here "
        f"takes {new} samples, so epoch {epoch} has {steps_left} steps left, and a whole epoch is "
        f"{math.ceil(rows / new)} steps instead of {math.ceil(rows / old)}. --trainer.max_steps counts "
        f"optimizer steps, of either size.{first}"
    )
    return info, warning


def resume_on_this_cluster(trainer: Any, saved_rng_states: int, model: nn.Module | None) -> None:
    """At the start of a resumed fit: align Lightning's loop to the loader's position and say what the resume
    keeps and changes (rank 0). A fresh fit, or a loader not of this package, is left alone."""
    sampler = train_sampler(trainer)
    resumed = sampler.resumed if sampler is not None else None
    if resumed is not None:
        sampler.resumed = None
        align_loop_counters(trainer, resumed)
        info, warning = position_report(resumed, trainer.global_step)
        rank_zero_info(info)
        if warning is not None:
            rank_zero_warn(warning)
    report = rng_report(saved_rng_states, trainer.world_size, largest_dropout(model))
    if report is not None:
        rank_zero_info(report)
