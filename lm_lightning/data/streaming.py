"""Training blocks tokenized and packed on the fly from a streamed corpus (no download, no cache).

``StreamingBlocks`` reads a ``datasets.IterableDataset`` of texts one shard (file) at a time and packs each
shard into ``block_size`` blocks with :class:`~lm_lightning.data.packing.BlockPacker`. Shards are dealt out
whole: to DDP ranks as ``datasets.distributed.split_dataset_by_node(strategy="shards")`` deals them
(rank ``r`` of ``R`` gets every ``R``-th shard), then to the rank's DataLoader workers the way ``datasets``
deals shards to workers. Each shard is packed on its own, so every process of every rank sees a disjoint
set of whole shards and, together, exactly the blocks that one process reading every shard sees: no block
is read twice or skipped within a pass. The price: each shard drops at most one partial block at its end
(one block per file, not per 1,000 texts as the reference ``group_texts`` does).

The stream repeats (pass 0, 1, 2, ...; the shard order is reshuffled each pass from ``seed``), so ranks
whose shards hold fewer blocks never run dry while the others still train (a finite stream of uneven
length per rank would hang DDP at the next gradient all-reduce): train by ``trainer.max_steps``.

The position (pass, shard, the source's own ``state_dict`` before the current batch of texts, the carried
tokens, blocks already given) is this dataset's ``state_dict``, which torchdata's ``StatefulDataLoader``
collects from every worker and Lightning stores in the checkpoint: a fit resumed mid-pass continues with
the next block.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from datasets import IterableDataset as HFIterableDataset
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase

from lm_lightning.data.packing import BlockPacker

# torchdata 0.11 calls a deprecated torch function each time a stateful loader starts an epoch.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)


class StreamingBlocks(IterableDataset):
    """Packed ``{"input_ids": LongTensor[block_size]}`` blocks from a stream of texts.

    Args:
        texts: A ``datasets.IterableDataset`` with a text column (``load_dataset(..., streaming=True)``).
        tokenizer: A fast tokenizer.
        text_column: The column holding the text.
        block_size: Tokens per block.
        eos_between_texts: Insert the EOS token after each non-empty text.
        map_batch_size: Texts tokenized together.
        rank: This process's global rank.
        world_size: Number of processes (DDP ranks).
        seed: Seed of the per-pass shard order.
        passes: Passes over the corpus; ``None`` repeats without end (training).
        skip_empty: Skip texts that are null (not strings) instead of failing.
    """

    def __init__(
        self,
        texts: HFIterableDataset,
        tokenizer: PreTrainedTokenizerBase,
        text_column: str = "text",
        block_size: int = 1024,
        eos_between_texts: bool = False,
        map_batch_size: int = 1000,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 42,
        passes: int | None = None,
        skip_empty: bool = False,
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not in [0, world_size={world_size}).")
        if texts.num_shards < world_size:
            raise ValueError(
                f"The streamed corpus has {texts.num_shards} shard(s) (files) for {world_size} processes: "
                "some ranks would get no data. Split the corpus into at least as many files as processes (a "
                "multiple of it balances the ranks), or set --data.streaming false."
            )
        self.texts = texts
        self.tokenizer = tokenizer
        self.text_column = text_column
        self.block_size = block_size
        self.eos_between_texts = eos_between_texts
        self.map_batch_size = map_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.passes = passes
        self.skip_empty = skip_empty
        self._state: dict[str, Any] | None = None
        self._resume: dict[str, Any] | None = None

    @property
    def num_shards(self) -> int:
        """Shards (files) in the whole corpus."""
        return self.texts.num_shards

    def shards_of(self, pass_index: int, worker: int = 0, num_workers: int = 1) -> list[int]:
        """The shards that this rank's ``worker`` reads in pass ``pass_index``, in order."""
        order = np.random.default_rng([self.seed, pass_index]).permutation(self.num_shards).tolist()
        return order[self.rank :: self.world_size][worker::num_workers]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            # A forked worker must not use the Rust tokenizer's thread pool that the parent may have
            # started (it deadlocks: huggingface/tokenizers#187); the workers are the parallelism here.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        if worker == 0 and self.num_shards < self.world_size * num_workers:
            warnings.warn(
                f"{self.num_shards} shard(s) for {self.world_size} rank(s) x {num_workers} DataLoader "
                "workers: some workers have no shard and stay idle. Split the corpus into more files, or "
                "lower --data.num_workers.",
                stacklevel=2,
            )
        packer = BlockPacker(
            self.tokenizer, self.text_column, self.block_size, self.eos_between_texts, self.skip_empty
        )
        start = self._resume or {"pass": 0, "shard": 0, "source": None, "carry": [], "given": 0}
        self._resume = None
        pass_index = start["pass"]
        while self.passes is None or pass_index < self.passes:
            shards = self.shards_of(pass_index, worker, num_workers)
            first = start["shard"] if pass_index == start["pass"] else 0
            for position in range(first, len(shards)):
                resuming = pass_index == start["pass"] and position == start["shard"]
                source = self.texts.shard(num_shards=self.num_shards, index=shards[position])
                if resuming and start["source"] is not None:
                    source.load_state_dict(start["source"])
                packer.carry = np.asarray(start["carry"] if resuming else [], dtype=np.int32)
                skip = start["given"] if resuming else 0
                before: dict | None = start["source"] if resuming else None
                for batch in source.iter(batch_size=self.map_batch_size):
                    carry_before = packer.carry.tolist()
                    blocks = packer(batch)["input_ids"]  # (n, block_size) int32
                    for i in range(skip, len(blocks)):
                        self._state = {
                            "pass": pass_index,
                            "shard": position,
                            "source": before,
                            "carry": carry_before,
                            "given": i + 1,
                        }
                        yield {"input_ids": torch.from_numpy(blocks[i].astype(np.int64))}
                    skip = 0
                    before = source.state_dict()  # the source's position after this batch of texts
                # The shard's last partial block (packer.carry) is dropped here: shards are packed apart.
            pass_index += 1

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands: after the last block given."""
        return dict(self._state) if self._state is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the next iteration with the block after the one ``state_dict`` was taken at."""
        self._resume = dict(state_dict) if state_dict else None


# --------------------------------------------------------------------------------- loader
def stateful_loader(dataset: StreamingBlocks, **kwargs: Any) -> StatefulDataLoader:
    """A loader whose ``state_dict`` Lightning checkpoints (every worker's stream position included).

    torchdata's ``StatefulDataLoader``, reporting the position *before* the last batch it gave: Lightning's
    training loop draws one batch ahead of the step it trains (``_PrefetchDataFetcher``, to know which
    batch is last), so a checkpoint written after step ``k`` is taken when batch ``k + 1`` has been drawn
    but not trained on; the loader's own position would skip it on resume.
    """

    class OneBatchBehindLoader(StatefulDataLoader):
        def __iter__(self) -> Iterator[Any]:
            iterator = super().__iter__()
            self._before_last: dict | None = None

            def batches() -> Iterator[Any]:
                while True:
                    state = StatefulDataLoader.state_dict(self)
                    try:
                        batch = next(iterator)
                    except StopIteration:
                        return
                    self._before_last = state
                    yield batch

            return batches()

        def state_dict(self) -> dict[str, Any]:
            before_last = getattr(self, "_before_last", None)
            return before_last if before_last is not None else super().state_dict()

    return OneBatchBehindLoader(dataset, **kwargs)


def streaming_loader(data: Any, collate_fn: Any) -> StatefulDataLoader:
    """The train loader of a ``CausalLMDataModule`` with ``streaming=True`` (its ``train_texts`` set up)."""
    from lightning.pytorch.callbacks import Timer

    from lm_lightning.data.global_batches import stream_step_collator

    trainer = data.trainer
    timed = any(isinstance(c, Timer) for c in getattr(trainer, "callbacks", []))
    if trainer is not None and trainer.max_steps == -1 and not timed:  # max_time set: a Timer is there
        raise ValueError(
            "streaming=True repeats the train split without end (ranks stay in step under DDP): set "
            "--trainer.max_steps, and an integer --trainer.val_check_interval to validate every N "
            "training batches (micro-batches: N / accumulate_grad_batches optimizer steps)."
        )
    blocks = StreamingBlocks(
        data.train_texts,
        data.tokenizer,
        text_column=data.text_column,
        block_size=data.block_size,
        eos_between_texts=data.eos_between_texts,
        map_batch_size=data.map_batch_size,
        rank=trainer.global_rank if trainer is not None else 0,
        world_size=trainer.world_size if trainer is not None else 1,
        seed=data.seed,
        skip_empty=data.skip_empty,
    )
    return stateful_loader(
        blocks,
        batch_size=data.batch_size,
        num_workers=data.num_workers,
        pin_memory=data._pin(),
        persistent_workers=data.num_workers > 0,
        collate_fn=stream_step_collator(collate_fn, trainer, data.batch_size, data.block_size),
    )
