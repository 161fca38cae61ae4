"""AdamW with decoupled weight decay on weights only, and the per-step learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from transformers import get_scheduler

from lm_lightning.errors import check_schedule_length

SchedulerName = Literal["constant", "linear", "cosine"]
SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: weights decay; biases and normalisation parameters do not."""
    no_decay: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, nn.LayerNorm | nn.GroupNorm) or "norm" in type(module).__name__.lower()
        for name, param in module.named_parameters(recurse=False):
            if is_norm or name == "bias":
                no_decay.add(id(param))
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
    ]


def adamw(
    groups: list[dict[str, Any]],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    device: torch.device,
    scaled_clipping: bool = False,
) -> torch.optim.AdamW:
    """AdamW, fused where the device supports it and no ``GradScaler`` meets gradient clipping."""
    fused = device.type in ("cuda", "cpu") and not scaled_clipping
    return torch.optim.AdamW(
        groups,
        lr=lr,
        betas=tuple(betas),
        eps=eps,
        # torch has fused AdamW kernels for CPU and CUDA; on CPU they are about 4x faster than the for-each
        # ones (docs/benchmarks.md). Not with a GradScaler (16-mixed) and gradient clipping: a fused AdamW
        # unscales the gradients inside its own step(), after clipping, so clipping would see scaled
        # gradients and Lightning refuses it (Lightning #21435). Lightning unscales for-each's gradients
        # before clipping.
        fused=fused,
        foreach=not fused,
    )


def clips_scaled_gradients(trainer: Any) -> bool:
    """Whether the trainer clips gradients while a ``GradScaler`` scales them (``16-mixed``)."""
    return bool(trainer.gradient_clip_val) and getattr(trainer.precision_plugin, "scaler", None) is not None


def clip_gradients(
    trainer: Any, optimizer: torch.optim.Optimizer, value: float | None, algorithm: Any
) -> bool:
    """Clip unscaled gradients under ``bf16-mixed`` (no ``GradScaler``); ``False`` to let Lightning clip.

    Lightning's ``MixedPrecision`` plugin refuses to clip for any optimizer that unscales its own gradients
    (a fused one), even under ``bf16-mixed``, which has no ``GradScaler``: there the gradients are not
    scaled and clipping them is right, so the base ``Precision`` plugin's clipping is used.
    """
    plugin = trainer.precision_plugin
    if not (isinstance(plugin, MixedPrecision) and plugin.scaler is None and value):
        return False
    Precision.clip_gradients(plugin, optimizer, value, GradClipAlgorithmType(algorithm or "norm"))
    return True


class ClipsFusedUnderBf16Mixed:
    """A ``LightningModule`` mix-in: clip as Lightning does, also for a fused AdamW under ``bf16-mixed``."""

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: int | float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """See :func:`clip_gradients`; otherwise Lightning's own clipping."""
        if not clip_gradients(self.trainer, optimizer, gradient_clip_val, gradient_clip_algorithm):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


def total_steps(trainer: Any, name: SchedulerName, warmup_ratio: float) -> int:
    """The number of optimizer steps a schedule spans; 1 for ``constant`` in an open-ended run.

    ``estimated_stepping_batches`` is ``inf`` with ``max_epochs=-1`` (what ``max_time`` alone gives) and -1
    for a dataset without length and no ``max_steps``: ``int()`` of the first raises, and the second made
    a one-step schedule (learning rate 0 after step 1). A schedule that needs the length is refused.
    """
    total = trainer.estimated_stepping_batches
    if math.isfinite(total) and total >= 0:
        return max(int(total), 1)
    check_schedule_length(name, warmup_ratio, open_ended=True)
    return 1  # the constant schedule does not use it


def lr_schedule(
    name: SchedulerName,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """``transformers.get_scheduler``'s schedule of ``name`` over ``total_steps`` optimizer steps."""
    warmup = warmup_steps or int(warmup_ratio * total_steps)
    return get_scheduler(SCHEDULERS[name], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def optimizers(model: nn.Module, hp: Any, trainer: Any) -> dict[str, Any]:
    """``configure_optimizers``' answer: AdamW over ``model`` and its per-step schedule over the whole fit.

    ``hp``: the module's hyper-parameters (``learning_rate``, ``weight_decay``, ``betas``, ``eps``,
    ``lr_scheduler``, ``warmup_steps``, ``warmup_ratio``).
    """
    total = total_steps(trainer, hp.lr_scheduler, hp.warmup_ratio)  # an open-ended run fails first
    groups = parameter_groups(model, hp.weight_decay)
    device = next(model.parameters()).device
    optimizer = adamw(groups, hp.learning_rate, hp.betas, hp.eps, device, clips_scaled_gradients(trainer))
    scheduler = lr_schedule(hp.lr_scheduler, optimizer, total, hp.warmup_steps, hp.warmup_ratio)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def replan_schedule(trainer: Any, planned_before: int | None, planned_now: int | None) -> None:
    """After a resume: every parameter group's learning rate from the new plan at the step reached.

    Lightning restores the optimizer's param groups, learning rates included, and the scheduler's step count;
    the schedule's functions are the new fit's, planned over its own length. Until the first scheduler step
    the optimizer would keep the old plan's last rate (0 at the end of a linear decay), so it is set from the
    new plan here. A change of length is said.
    """
    lr = None
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        lambdas = getattr(scheduler, "lr_lambdas", None)  # LambdaLR: what transformers.get_scheduler makes
        if lambdas is None:
            continue
        for group, base_lr, fn in zip(
            scheduler.optimizer.param_groups, scheduler.base_lrs, lambdas, strict=True
        ):
            group["lr"] = base_lr * fn(scheduler.last_epoch)
        lr = scheduler.optimizer.param_groups[0]["lr"]
    if planned_before is not None and planned_now is not None and planned_before != planned_now:
        rank_zero_info(
            f"Resuming with a learning-rate schedule over {planned_now} optimizer steps (it was planned over "
            f"{planned_before}): planned again from step {trainer.global_step}"
            + (f", where its learning rate is {lr:.3g}." if lr is not None else ".")
        )
