"""The training order: one seeded order of the rows per epoch, cut into optimizer steps of one global batch.

Each epoch has one order of the ``N`` training rows, a function of ``(seed, epoch)`` only. Optimizer step
``s`` takes the ``G = batch_size x accumulate_grad_batches x world_size`` rows ``s*G .. (s+1)*G - 1`` of that
order; micro-batch ``m`` of process ``r`` holds the step's rows ``(m*W + r)*B .. (m*W + r)*B + B - 1``, so the
rows of a step do not depend on how the global batch is split into processes and micro-batches. The epoch's
last step takes the rows that are left: as many micro-batches as they fill, the same number on every process
(DDP and FSDP need equal collectives), the shortfall filled with padding rows that carry no target.

Each micro-batch also carries what the optimizer step needs before its first backward, with no collective:
``step_units``, the step's total weight (its next-token targets, from per-row counts made once from the cached
columns, or its rows), and ``step_micro_batches``. The loss of a micro-batch is then scaled so that the
accumulated, all-reduced gradient is that of the step's mean (``lm_lightning.model.step``).

The position is global: a checkpoint records the seed, the epoch and how many samples of the epoch's order are
consumed (with the global batch it was consumed at), the same on every process, so rank 0's loader state
(the one Lightning saves) is right for every rank, and for any number of processes: a resume on another
number goes on from the next sample of the same order (``lm_lightning.model.elastic``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset, DistributedSampler, default_collate
from torchdata.stateful_dataloader import StatefulDataLoader

from lm_lightning.data.sampling import PADDING
from lm_lightning.model.loss import IGNORE_INDEX

# What a step's loss is averaged over: each next-token target, or each row (a preference pair, for one).
LossUnit = Literal["targets", "rows"]

# Batch fields that the training loaders add, read by the training step (plain data: never moved or synced).
STEP_UNITS = "step_units"
STEP_MICRO_BATCHES = "step_micro_batches"
SAMPLE_INDEX = "sample_index"


# ----------------------------------------------------------------------------- per-row weights
def row_units(dataset: Any, unit: LossUnit = "targets", eos_token_id: int | None = None) -> np.ndarray:
    """Each training row's weight in the loss: its next-token targets, or 1 a row (``unit="rows"``).

    Counted once, vectorised, from the cached Arrow columns, as the loss counts them: a position is a target
    when the label after it is not -100. Rows with ``labels`` (fine-tuning examples) count their labels after
    the first; blocks of text have ``block_size - 1`` targets each, fewer under document masking
    (``eos_token_id``: each token after an EOS starts a document and is not a target).
    """
    n_rows = len(dataset)
    if unit == "rows":
        return np.ones(n_rows, dtype=np.int64)
    if unit != "targets":
        raise ValueError(f"loss unit {unit!r} is unknown; choose 'targets' or 'rows'.")
    columns = dataset.column_names
    if "labels" in columns:
        labels = dataset.select_columns(["labels"]).with_format("arrow")[:]["labels"]
        return np.concatenate([_label_targets(chunk) for chunk in labels.chunks] or [np.zeros(0, np.int64)])
    ids = dataset.select_columns(["input_ids"]).with_format("arrow")[:]["input_ids"]
    block_size = ids.type.list_size
    if eos_token_id is None:
        return np.full(n_rows, block_size - 1, dtype=np.int64)
    counts = []
    for chunk in ids.chunks:  # (rows, block_size) views of the memory-mapped file, one record batch a time
        tokens = pc.list_flatten(chunk).to_numpy().reshape(-1, block_size)
        counts.append(block_size - 1 - (tokens[:, :-1] == eos_token_id).sum(axis=1))
    return np.concatenate(counts or [np.zeros(0, np.int64)]).astype(np.int64)


def training_units(trainer: Any, dataset: Any, eos_token_id: int | None = None) -> np.ndarray:
    """:func:`row_units` in the unit that the trainer's module averages its loss over (its ``loss_unit``)."""
    module = getattr(trainer, "lightning_module", None) if trainer is not None else None
    return row_units(dataset, getattr(module, "loss_unit", "targets"), eos_token_id)


def _label_targets(chunk: Any) -> np.ndarray:
    """Per row of a chunk of label lists: how many labels after the first are not -100."""
    lengths = pc.list_value_length(chunk).to_numpy(zero_copy_only=False).astype(np.int64)
    valid = pc.list_flatten(chunk).to_numpy(zero_copy_only=False) != IGNORE_INDEX
    ends = np.cumsum(lengths)
    starts = ends - lengths
    running = np.concatenate([[0], np.cumsum(valid, dtype=np.int64)])
    first = np.zeros(len(lengths), dtype=np.int64)
    first[lengths > 0] = valid[starts[lengths > 0]]
    return running[ends] - running[starts] - first


# ----------------------------------------------------------------------------- the sampler
@dataclasses.dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of one process: its rows (:data:`PADDING` for padding) and its step's totals."""

    rows: tuple[int, ...]
    filler: int  # a real row of the step, read in place of each padding row (so that shapes stay real)
    step_units: int
    step_micro_batches: int


class GlobalBatchSampler(DistributedSampler):
    """Yields this process's :class:`MicroBatch` es of each epoch, in the global order described above.

    A ``DistributedSampler`` only so that Lightning leaves it alone: with ``use_distributed_sampler`` (on by
    default) Lightning puts its own ``DistributedSampler`` into any loader whose sampler is not one. It is
    stateful for torchdata's ``StatefulDataLoader`` (which Lightning checkpoints), ``num_workers`` 0 or more:
    :meth:`state_dict` is the global position, :meth:`load_state_dict` makes the next epoch's iteration go on
    from it. Lightning sets the epoch (``set_epoch``) as for any ``DistributedSampler``.

    Args:
        units: Each row's weight in the loss (:func:`row_units`); its length is the number of rows.
        batch_size: Rows per micro-batch and process (``B``).
        accumulate: Micro-batches per optimizer step (``A``, ``trainer.accumulate_grad_batches``).
        world_size: Processes (``W``).
        rank: This process's global rank.
        seed: Seed of the epochs' orders.
        limit_batches: At most this many micro-batches an epoch (``trainer.limit_train_batches``).
    """

    def __init__(
        self,
        units: np.ndarray,
        batch_size: int,
        accumulate: int = 1,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        limit_batches: int | float | None = None,
    ) -> None:
        super().__init__(units, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.units = np.asarray(units, dtype=np.int64)
        self.num_rows = len(self.units)
        self.batch_size, self.accumulate, self.world_size = batch_size, accumulate, world_size
        self.global_batch = batch_size * accumulate * world_size
        self._length = self._micro_batches_from(0)
        # The micro-batches an epoch trains, counted as Lightning counts them from the loader's length.
        self._epoch_batches = self._length
        if isinstance(limit_batches, float):
            self._epoch_batches = int(self._length * limit_batches)
        elif isinstance(limit_batches, int):
            self._epoch_batches = min(self._length, limit_batches)
        self.consumed = 0  # samples of this epoch's order consumed, by every process together
        self._batches = 0  # micro-batches of this epoch yielded, or counted as done before a resume
        self._resume: dict[str, Any] | None = None
        self.resumed: Resumed | None = None  # the position loaded last, until the fit has used it

    def _micro_batches_from(self, start: int) -> int:
        """Micro-batches an epoch yields from sample ``start`` on, without a limit (see :meth:`__iter__`)."""
        if start >= self.num_rows:
            return 0
        first_end = self._step_end(start)
        full, rest = divmod(self.num_rows - first_end, self.global_batch)
        per_micro = self.batch_size * self.world_size
        first = math.ceil((first_end - start) / per_micro)
        return first + full * self.accumulate + math.ceil(rest / per_micro)

    def _step_end(self, position: int) -> int:
        """Where the step that takes sample ``position`` ends: on a multiple of the global batch (only a
        resume after a change of it starts between two), or at the epoch's last sample."""
        return min((position // self.global_batch + 1) * self.global_batch, self.num_rows)

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's order of the rows: a function of the seed and the epoch only."""
        # torch's generator as DistributedSampler seeds it: one process sees the order it saw before.
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_rows, generator=generator).numpy()

    def __len__(self) -> int:
        return self._length

    def set_epoch(self, epoch: int) -> None:
        """Lightning's call at the start of each epoch: a new epoch's position starts at its first sample."""
        if epoch != self.epoch:
            self.consumed, self._batches = 0, 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[MicroBatch]:
        start, done = self._take_resume()
        order = self.order(self.epoch)
        per_micro = self.batch_size * self.world_size
        budget = self._epoch_batches - done  # micro-batches left, as Lightning counts them
        position = start
        self.consumed, self._batches = start, done
        while position < self.num_rows and budget > 0:
            end = self._step_end(position)
            n_micro = min(math.ceil((end - position) / per_micro), budget)
            end = min(end, position + n_micro * per_micro)  # a step cut short by limit_train_batches
            step_rows = order[position:end]
            units = int(self.units[step_rows].sum())
            for m in range(n_micro):
                first = position + m * per_micro + self.rank * self.batch_size
                span = range(first, first + self.batch_size)
                rows = tuple(int(order[p]) if p < end else PADDING for p in span)
                self.consumed = min(position + (m + 1) * per_micro, end)
                self._batches += 1
                yield MicroBatch(rows, int(step_rows[0]), units, n_micro)
            budget -= n_micro
            position = end

    def _take_resume(self) -> tuple[int, int]:
        """The sample to start this epoch's iteration at, and the micro-batches counted as done before it."""
        resume, self._resume = self._resume, None
        if resume is None:
            return 0, 0
        if resume["epoch"] != self.epoch:
            warnings.warn(
                f"The checkpoint's data position is in epoch {resume['epoch']}, and training resumes epoch "
                f"{self.epoch}: it starts from the beginning of epoch {self.epoch}.",
                stacklevel=3,
            )
            return 0, 0
        return int(resume["consumed"]), self.batches_done(resume)

    def batches_done(self, state: dict[str, Any]) -> int:
        """The micro-batches of ``state``'s epoch that this sampler counts as done at ``state``'s position.

        The count that Lightning's loop must hold (``batch_progress``) for its optimizer steps and the epoch's
        end to fall where this sampler's do. With the global batch of ``state`` it is the saved count. With
        another one the steps go on from the same sample: a step that starts between two multiples of the new
        global batch takes the samples up to the next one, and counts as a whole step, its first micro-batches
        done before it.
        """
        if state.get("epoch_done") or state["consumed"] >= self.num_rows:
            return self._epoch_batches
        done = self._length - self._micro_batches_from(int(state["consumed"]))
        return min(done, self._epoch_batches)

    def state_dict(self) -> dict[str, Any]:
        """The global position: seed, epoch, samples of the epoch's order consumed, and the batch sizes."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "consumed": self.consumed,
            "epoch_done": self.consumed >= self.num_rows or self._batches >= self._epoch_batches,
            "num_rows": self.num_rows,
            "global_batch": self.global_batch,
            "batch_size": self.batch_size,
            "accumulate": self.accumulate,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on from ``state``'s position at the next iteration (of the same epoch), whatever the number of
        processes and the batch sizes that wrote it: :attr:`resumed` says from where, and how."""
        if "consumed" not in state:  # the per-rank sampler of older versions: not a global position
            raise ValueError(
                "The checkpoint's data position is not a global one (an older lm_lightning wrote it): resume "
                "with the version that wrote it, or start the fit anew."
            )
        if state["num_rows"] != self.num_rows or state["seed"] != self.seed:
            raise ValueError(
                f"The checkpoint's data position is for {state['num_rows']} rows shuffled with seed "
                f"{state['seed']}; this training split has {self.num_rows} rows and seed {self.seed}. Resume "
                "with the data and --data.seed it was written with."
            )
        self.epoch = int(state["epoch"])  # a loader with workers draws ahead before Lightning sets the epoch
        self._resume = dict(state)
        self.resumed = Resumed(
            state=dict(state),
            batches_done=self.batches_done(state),
            global_batch=self.global_batch,
            split=(self.world_size, self.batch_size, self.accumulate),
        )


@dataclasses.dataclass(frozen=True)
class Resumed:
    """Where a loaded position goes on (``lm_lightning.model.elastic`` says so and aligns the loop to it)."""

    state: dict[str, Any]  # the checkpoint's sampler state
    batches_done: int  # micro-batches of the epoch counted as done, at this run's batch sizes
    global_batch: int  # this run's
    split: tuple[int, int, int]  # this run's processes, batch size and accumulation


# ----------------------------------------------------------------------------- rows and batches
class StepRows(Dataset):
    """``dataset`` read one :class:`MicroBatch` at a time (the loader's ``batch_size`` is ``None``)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, micro: MicroBatch) -> tuple[list[Any], MicroBatch]:
        keys = [micro.filler if row == PADDING else row for row in micro.rows]
        getitems = getattr(self.dataset, "__getitems__", None)  # datasets reads a batch of rows at once
        rows = getitems(keys) if getitems is not None else [self.dataset[k] for k in keys]
        if PADDING in micro.rows:  # padding rows look like padding to the collators: all labels -100
            rows = [dict(row) for row in rows]
            for row, index in zip(rows, micro.rows, strict=True):
                # Each sequence of the row: "input_ids", or a preference pair's chosen_ and rejected_ ones.
                for side in [key.removesuffix("input_ids") for key in row if key.endswith("input_ids")]:
                    ids = torch.as_tensor(row[f"{side}input_ids"])
                    if index == PADDING:
                        row[f"{side}labels"] = torch.full_like(ids, IGNORE_INDEX)
                    else:
                        row.setdefault(f"{side}labels", ids)  # blocks of text: every row then has labels
        return rows, micro


class StepCollator:
    """Rows of a :class:`MicroBatch` -> the inner collator's batch, with padding rows' labels all -100 (they
    come so from :class:`StepRows`, and are set again whatever the collator made of them) and the step's
    fields: :data:`STEP_UNITS`, :data:`STEP_MICRO_BATCHES`, :data:`SAMPLE_INDEX` (the rows)."""

    def __init__(self, collate_fn: Any = None) -> None:
        self.collate_fn = collate_fn or default_collate

    def __call__(self, item: tuple[list[Any], MicroBatch]) -> dict[str, Any]:
        rows, micro = item
        batch = dict(self.collate_fn(rows))
        padding = [i for i, row in enumerate(micro.rows) if row == PADDING]
        if padding:  # done here, whatever the inner collator makes of the copied rows' labels
            labels = batch.get("labels", batch["input_ids"]).clone()
            labels[padding] = IGNORE_INDEX
            batch["labels"] = labels
        batch[STEP_UNITS] = micro.step_units
        batch[STEP_MICRO_BATCHES] = micro.step_micro_batches
        batch[SAMPLE_INDEX] = list(micro.rows)
        return batch


class ConstantStepCollator:
    """The inner collator's batch with fixed step fields: every step of a stream of full blocks is alike."""

    def __init__(self, collate_fn: Any, step_units: int, step_micro_batches: int) -> None:
        self.collate_fn = collate_fn or default_collate
        self.step_units, self.step_micro_batches = step_units, step_micro_batches

    def __call__(self, rows: list[Any]) -> dict[str, Any]:
        batch = dict(self.collate_fn(rows))
        batch[STEP_UNITS] = self.step_units
        batch[STEP_MICRO_BATCHES] = self.step_micro_batches
        return batch


def stream_step_collator(
    collate_fn: Any, trainer: Any, batch_size: int, block_size: int
) -> ConstantStepCollator:
    """The step fields of a stream of full blocks (``block_size - 1`` targets each), for ``trainer``'s steps.

    An epoch cut short by an integer ``limit_train_batches`` that is not a multiple of
    ``accumulate_grad_batches`` would end on a shorter step, whose total differs: refused.
    """
    world_size, accumulate = (trainer.world_size, trainer.accumulate_grad_batches) if trainer else (1, 1)
    limit = trainer.limit_train_batches if trainer is not None else 1.0
    if isinstance(limit, int) and limit % accumulate:
        raise ValueError(
            f"--trainer.limit_train_batches={limit} cuts each epoch of the stream inside an optimizer step "
            f"(--trainer.accumulate_grad_batches={accumulate}): give a multiple of {accumulate}."
        )
    module = getattr(trainer, "lightning_module", None) if trainer is not None else None
    per_row = 1 if getattr(module, "loss_unit", "targets") == "rows" else block_size - 1
    rows = batch_size * accumulate * world_size
    return ConstantStepCollator(collate_fn, rows * per_row, accumulate)


def global_batch_loader(
    dataset: Any,
    units: np.ndarray,
    *,
    batch_size: int,
    trainer: Any,
    seed: int,
    num_workers: int,
    pin_memory: bool,
    collate_fn: Any = None,
) -> StatefulDataLoader:
    """The training loader: :class:`GlobalBatchSampler` over ``dataset``; Lightning checkpoints its state."""
    world_size, rank, accumulate, limit = 1, 0, 1, None
    if trainer is not None:
        world_size, rank, limit = trainer.world_size, trainer.global_rank, trainer.limit_train_batches
        accumulate = trainer.accumulate_grad_batches
    sampler = GlobalBatchSampler(units, batch_size, accumulate, world_size, rank, seed, limit)
    return StatefulDataLoader(
        StepRows(dataset),
        batch_size=None,  # the sampler yields whole micro-batches
        sampler=sampler,
        collate_fn=StepCollator(collate_fn),
        # A generator of its own: a loader without one draws its workers' base seed from the global random
        # state, so a validation would shift the dropout masks of the training steps after it.
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
