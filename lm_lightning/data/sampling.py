"""Evaluation order under sharding: each block on one process, and the same number of batches on every one."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler

from lm_lightning.model.loss import IGNORE_INDEX

PADDING = -1  # the index of a padding block


class EvenUnrepeatedSampler(DistributedSampler):
    """Rank ``r`` of ``R`` takes blocks ``r, r + R, ...`` (each block once, as Lightning's
    ``UnrepeatedDistributedSampler``), then pads with :data:`PADDING` up to the same number of batches as
    every other rank.

    Under FSDP every forward pass is a collective (each unit's parameters are all-gathered), so a rank with
    one batch fewer would leave the others waiting forever. A padding block counts no target token
    (:class:`PaddedBlocks`), so the perplexity stays exact. A ``DistributedSampler``, so that Lightning does
    not split its indices across the ranks once more.
    """

    def __init__(self, dataset: Any, num_replicas: int, rank: int, batch_size: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        num_samples = len(dataset)
        self.indices = list(range(rank, num_samples, num_replicas))
        per_rank = -(-num_samples // num_replicas)
        batches = -(-per_rank // batch_size)
        self.indices += [PADDING] * (batches * batch_size - len(self.indices))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class PaddedBlocks(Dataset):
    """A split of token blocks, with ``labels``; index :data:`PADDING` is a block whose labels are ignored."""

    def __init__(self, blocks: Any) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = dict(self.blocks[max(index, 0)])
        ids = row["input_ids"]
        if index == PADDING:
            row["labels"] = torch.full_like(torch.as_tensor(ids), IGNORE_INDEX)
        else:
            row.setdefault("labels", ids)
        return row
