"""AdamW with decoupled weight decay on weights only, and the per-step learning-rate schedule."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from transformers import get_scheduler

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
) -> torch.optim.AdamW:
    """AdamW, fused where the device supports it."""
    return torch.optim.AdamW(
        groups,
        lr=lr,
        betas=tuple(betas),
        eps=eps,
        # torch has fused AdamW kernels for CPU and CUDA; on CPU it is several times faster than the
        # default for-each implementation (about 0.05 s instead of 0.25 s a step for 16 M parameters).
        fused=device.type in ("cuda", "cpu"),
    )


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
