"""The optimizer step as the unit of the loss, decided once per step with one collective and one host sync.

A step's loss is the sum of the loss over every unit (next-token target, or row) of every micro-batch on every
process, divided by the step's number of units. That total rides on each training batch (``step_units``,
planned from the data by ``lm_lightning.data.global_batches``), so it is known before the step's first
backward with no collective: each micro-batch's objective is ``loss_sum * accumulate * world_size /
step_units``. Lightning divides the closure loss by ``accumulate_grad_batches`` (always, the epoch's shorter
last window too) and DDP's all-reduce (FSDP2's reduce-scatter) averages over the processes, which cancels both
factors: the accumulated gradient is exactly that of the step's mean, however the global batch is split.

Nothing is read back per micro-batch. Each adds, on the device, its loss sum, its own unit count, a
non-finite flag and its auxiliary loss to a small float64 vector. In ``on_before_optimizer_step`` (once per
step, after every backward, before Lightning clips), one all-gather of that vector, with the interrupt signal,
and one ``.tolist()`` give every process the same numbers: the step's loss (logged as a host tensor, so that
Lightning's logging reads no device value), whether a micro-batch on some process was not finite (then the
whole step is skipped, every gradient dropped so that neither the weights nor AdamW's moments change, or it
raises before any weight changes), and whether a signal asks the fit to stop (``CheckpointOnInterrupt``).
The units the loss counted are checked against the planned total: a collator that loses a label mask would
otherwise make the loss silently inexact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lm_lightning.data.global_batches import STEP_MICRO_BATCHES, STEP_UNITS
from lm_lightning.errors import RunError
from lm_lightning.model.faults import NonFiniteAction, nonfinite_step
from lm_lightning.model.interrupts import pending_signal

# The per-process vector gathered once per step.
_LOSS, _UNITS, _NONFINITE, _SIGNAL, _AUX = range(5)


@dataclasses.dataclass(frozen=True)
class StepOutcome:
    """What every process knows after an optimizer step's one sync (plain Python values)."""

    step: int  # ``trainer.global_step`` once the step is done
    loss: float  # the step's loss: its summed loss over its units, all micro-batches and processes
    aux_loss: (
        float | None
    )  # a mixture of experts' load-balancing loss, the mean over the step's micro-batches
    skipped: bool  # a non-finite loss: the step changed nothing
    signal: int  # the largest signal number that a process received (0: none)


class StepLoss:
    """The micro-batches' objectives of each optimizer step, and the step's decision (see the module doc)."""

    def __init__(self) -> None:
        self.outcome: StepOutcome | None = None
        self.reset()

    def reset(self) -> None:
        """Forget a step in progress (a fit's start)."""
        self._sums: Tensor | None = None
        self._step_units: int | None = None
        self._micro_batches = 0
        self._batches: tuple[int, int] | None = None
        self._has_aux = False
        self._extras: tuple[str, ...] = ()

    def objective(
        self,
        module: Any,
        batch: Any,
        loss_sum: Tensor,
        units: Tensor | int,
        batch_idx: int,
        aux: Tensor | None = None,
        aux_weight: float = 0.0,
        extras: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """The micro-batch's tensor to back-propagate: ``loss_sum`` (summed over its ``units``: the count of
        targets or rows in this micro-batch, padding rows excluded) scaled to its share of the step's mean,
        plus ``aux_weight * aux`` as the mean over the step's micro-batches (each micro-batch on each process
        weighs the same). ``extras``: other sums over the micro-batch's units (detached), each logged as
        ``train/<name>``, the step's total over its units, within the same one sync."""
        trainer = module._trainer
        accumulate, world_size = (trainer.accumulate_grad_batches, trainer.world_size) if trainer else (1, 1)
        step_units = batch.get(STEP_UNITS) if isinstance(batch, Mapping) else None
        if not isinstance(units, Tensor):
            units = loss_sum.new_full((), units)  # a fill on the device: no host-to-device copy
        if step_units is None:  # a loader of the user's own: exact only when a micro-batch is the whole step
            if accumulate * world_size > 1:
                raise RunError(
                    f"The training batches carry no {STEP_UNITS!r}, and an optimizer step has {accumulate} "
                    f"micro-batch(es) on {world_size} process(es): the loss cannot be weighted exactly "
                    "across them. Train from CausalLMDataModule's loader, or add to each batch "
                    f"{STEP_UNITS!r} (the step's total number of targets over all its micro-batches and "
                    f"processes) and {STEP_MICRO_BATCHES!r} (its micro-batches a process)."
                )
            objective = loss_sum / units.clamp_min(1)
            micro_batches = 1
        else:
            objective = loss_sum * (accumulate * world_size / max(int(step_units), 1))
            micro_batches = int(batch[STEP_MICRO_BATCHES])
            self._step_units = int(step_units)
        if aux is not None:
            # Lightning divides by accumulate and DDP by world_size: each micro-batch then weighs
            # 1 / (micro_batches * world_size), the shorter last step of an epoch included.
            objective = objective + aux * (aux_weight * accumulate / micro_batches)
        nonfinite = ~torch.isfinite(objective.detach())
        zero = loss_sum.new_zeros(())
        parts = [loss_sum.detach(), units, nonfinite, zero, zero if aux is None else aux.detach()]
        parts += [value.detach() for value in (extras or {}).values()]
        self._extras = tuple(extras or ())
        dtype = torch.float32 if loss_sum.device.type == "mps" else torch.float64  # MPS has no float64
        values = torch.stack([part.to(dtype) for part in parts])
        self._sums = values if self._sums is None else self._sums + values
        self._micro_batches += 1
        first = batch_idx if self._batches is None else self._batches[0]
        self._batches = (first, batch_idx)
        self._has_aux = aux is not None
        return objective

    def finish(self, module: Any, optimizer: torch.optim.Optimizer, action: NonFiniteAction) -> None:
        """The step's one collective and one host sync; then skip, raise, or log the step's loss.

        Called from ``on_before_optimizer_step``: after every backward of the step, before clipping.
        """
        if self._sums is None:
            return
        trainer = module.trainer
        sums = self._sums
        sums[_SIGNAL].fill_(float(pending_signal(trainer)))  # a fill on the device: no host-to-device copy
        gathered = module.all_gather(sums) if trainer.world_size > 1 else sums
        values = gathered.reshape(-1, len(sums)).tolist()  # the step's one host sync
        counted = int(sum(v[_UNITS] for v in values))
        units = self._step_units if self._step_units is not None else counted
        if self._step_units is not None and counted != self._step_units:
            raise RuntimeError(
                f"Optimizer step {trainer.global_step}: the loss counted {counted} units (targets or rows) "
                f"and the training loader planned {self._step_units}; the loss would not be the step's mean. "
                "A collator that keeps labels it should mask (-100) does this: please report it."
            )
        loss = sum(v[_LOSS] for v in values) / max(units, 1)
        aux_loss = None
        if self._has_aux:
            aux_loss = sum(v[_AUX] for v in values) / (self._micro_batches * trainer.world_size)
        bad_ranks = [rank for rank, v in enumerate(values) if v[_NONFINITE]]
        signal = int(max(v[_SIGNAL] for v in values))
        first, last = self._batches or (0, 0)
        extras = self._extras
        self.reset()
        self.outcome = StepOutcome(trainer.global_step + 1, loss, aux_loss, bool(bad_ranks), signal)
        if bad_ranks:
            batches = f"batch {first}" if first == last else f"batches {first}-{last}"
            where = f"at step {trainer.global_step} (epoch {trainer.current_epoch}, {batches}"
            where += f", on process {', '.join(map(str, bad_ranks))})" if trainer.world_size > 1 else ")"
            nonfinite_step(trainer, loss, where, action)  # raises, or says that the step is skipped
            drop_gradients(optimizer)
            return
        host = torch.tensor  # host tensors: Lightning's logging then never reads a device value
        module.log("train/loss", host(loss), on_step=True, on_epoch=False)
        if aux_loss is not None:
            module.log("train/aux_loss", host(aux_loss), on_step=True, on_epoch=False)
        module.log("train/lr", host(optimizer.param_groups[0]["lr"]), on_step=True, on_epoch=False)
        for i, name in enumerate(extras, start=_AUX + 1):
            module.log(
                f"train/{name}", host(sum(v[i] for v in values) / max(units, 1)), on_step=True, on_epoch=False
            )


def drop_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Every gradient to ``None``: AdamW then leaves the weights and its moments (and their step) alone."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = None
