"""The map-style loaders of the data module: resumable shuffled training, each block once in evaluation."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

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
) -> DataLoader:
    """A loader over ``dataset``: shuffled and stateful for training, in order (each row once) otherwise."""
    sampler = None
    world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    if shuffle:
        # The order of an epoch is a function of (seed, epoch), which Lightning sets each epoch, and the
        # sampler records how far into it training is: a resumed run sees the very same batches, in this
        # epoch and the next ones (torchdata's RandomSampler does not: its next epoch differs). Under DDP
        # each process takes its share, as with Lightning's own DistributedSampler.
        sampler = StatefulDistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )
    elif world_size > 1 and isinstance(trainer.strategy, ModelParallelStrategy):
        # FSDP2: every rank must run the same number of forward passes (each one is a collective).
        dataset = PaddedBlocks(dataset)
        sampler = EvenUnrepeatedSampler(dataset, world_size, rank, batch_size)
    elif world_size > 1:
        # Lightning's default DistributedSampler repeats blocks to even out the shards, which would
        # count them twice in the validation perplexity; this one gives each block to one rank.
        from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

        sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    # A generator of its own: a loader without one draws its workers' base seed from the global random
    # state, so a validation would shift the dropout masks of the training steps after it.
    generator = torch.Generator().manual_seed(seed)
    # The train loader is stateful: Lightning saves its state in each checkpoint, and a run resumed
    # mid-epoch goes on from the next batch (a plain DataLoader would restart the epoch).
    loader_cls = StatefulDataLoader if shuffle else DataLoader
    return loader_cls(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        generator=generator,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
