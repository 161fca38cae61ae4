"""The map-style loaders of the data module: global optimizer steps in training, each block once otherwise."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, Dataset

from lm_lightning.data.global_batches import global_batch_loader
from lm_lightning.data.sampling import EvenUnrepeatedSampler, PaddedBlocks


def map_style_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    trainer: Any,
    seed: int,
    num_workers: int,
    pin_memory: bool,
    collate_fn: Any = None,
    units: np.ndarray | None = None,
) -> DataLoader:
    """A loader over ``dataset``: for training (``shuffle``) the global order of optimizer steps, resumable
    (``lm_lightning.data.global_batches``; ``units``: each row's weight in the loss); in order, each row once,
    otherwise."""
    if shuffle:
        assert units is not None, "the training loader needs each row's weight in the loss"
        return global_batch_loader(
            dataset, units, batch_size=batch_size, trainer=trainer, seed=seed, num_workers=num_workers,
            pin_memory=pin_memory, collate_fn=collate_fn,
        )  # fmt: skip
    sampler = None
    world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    if world_size > 1 and isinstance(trainer.strategy, ModelParallelStrategy):
        # FSDP2: every rank must run the same number of forward passes (each one is a collective).
        dataset = PaddedBlocks(dataset)
        sampler = EvenUnrepeatedSampler(dataset, world_size, rank, batch_size)
    elif world_size > 1:
        # Lightning's default DistributedSampler repeats blocks to even out the shards, which would
        # count them twice in the validation perplexity; this one gives each block to one rank.
        from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

        sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        # Its own generator: a loader without one draws its workers' base seed from the global random state.
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
