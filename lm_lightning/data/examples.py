"""Tokenized fine-tuning examples -> rows of at most ``block_size`` tokens, their cache, and their batches.

Packed, several examples share a row (best-fit decreasing, trl's ``bfd``, within each ``datasets.map``
batch): position ids restart at 0 at each example and the first token of each example is not a target, so
with ``attention_mask=None`` transformers builds a block-diagonal causal mask (eager, sdpa) and no example
sees another, or predicts another's first token. Unpacked, one example a row. Either way a batch is
right-padded to its longest row (labels -100 on the padding). The loss is the same, to rounding, packed,
unpacked or one example at a time.

An example longer than ``block_size`` is truncated to its first ``block_size`` tokens (trl's default: the
tail of an answer cut from its prompt is no example to learn from). One whose targets all lie beyond that
(a prompt that fills the block) is dropped. Both are counted and logged.
"""

from __future__ import annotations

import bisect
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from datasets import DatasetDict, Features, List, Value
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lm_lightning.data.formats import IGNORE_INDEX, ROW_COLUMN, ExampleEncoder
from lm_lightning.data.packing import write_manifest
from lm_lightning.io import atomic_path

log = logging.getLogger(__name__)


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices per bin: each length, longest first, into the fullest bin it fits (deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin), sorted
    for i in order:
        k = bisect.bisect_left(free, (lengths[i], -1))  # the smallest space that fits
        if k < len(free):
            space, b = free.pop(k)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if space > lengths[i]:
            bisect.insort(free, (space - lengths[i], b))
    return bins


class ExamplePacker:
    """A ``datasets.map(batched=True)`` callable: tokenized examples -> rows of at most ``block_size``."""

    def __init__(self, block_size: int, packing: bool) -> None:
        self.block_size = block_size
        self.packing = packing

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        n = self.block_size
        keep = [j for j, first in enumerate(batch["first_target"]) if first < n]  # has a target in the block
        ids = [batch["input_ids"][j][:n] for j in keep]
        labels = [batch["labels"][j][:n] for j in keep]
        bins = (
            best_fit_decreasing([len(x) for x in ids], n) if self.packing else [[i] for i in range(len(ids))]
        )
        out: dict[str, list] = {"input_ids": [], "labels": []}
        if self.packing:
            out["position_ids"] = []
        for members in bins:
            out["input_ids"].append([t for i in members for t in ids[i]])
            # An example's first token would be predicted from the previous example's last: not a target.
            out["labels"].append([t for i in members for t in [IGNORE_INDEX, *labels[i][1:]]])
            if self.packing:
                out["position_ids"].append([p for i in members for p in range(len(ids[i]))])
        return out


def example_features(packing: bool) -> Features:
    """The cached columns of example rows."""
    columns = ["input_ids", "labels"] + (["position_ids"] if packing else [])
    return Features({c: List(Value("int32")) for c in columns})


def write_example_cache(
    raw: DatasetDict,
    path: Path,
    tokenizer: PreTrainedTokenizerBase,
    data_format: str,
    block_size: int,
    held_out: bool,
    *,
    completion_only_loss: bool,
    chat_template: str | None,
    packing: bool,
    map_batch_size: int,
    num_proc: int,
) -> None:
    """Encode and pack every split of ``raw`` into the cache folder ``path`` (written atomically).

    ``held_out``: the validation split was held out of the source's train split (its rows are named so).
    """
    with atomic_path(path, directory=True) as tmp:
        splits = _write_splits(
            raw,
            tmp,
            tokenizer,
            data_format,
            completion_only_loss,
            chat_template,
            block_size,
            packing,
            held_out,
            map_batch_size,
            num_proc,
        )
        write_manifest(tmp, block_size, data_format, splits)


def _write_splits(
    raw: DatasetDict,
    tmp: Path,
    tokenizer: PreTrainedTokenizerBase,
    data_format: str,
    completion_only_loss: bool,
    chat_template: str | None,
    block_size: int,
    packing: bool,
    held_out: bool,
    map_batch_size: int,
    num_proc: int,
) -> dict[str, Any]:
    splits: dict[str, Any] = {}
    for split, ds in raw.items():
        source_split = "train" if held_out and split == "validation" else split
        encoder = ExampleEncoder(tokenizer, data_format, completion_only_loss, chat_template, source_split)
        num = num_proc if num_proc > 1 else None
        examples = ds.map(
            encoder,
            batched=True,
            batch_size=map_batch_size,
            remove_columns=ds.column_names,
            cache_file_name=str(tmp / f"{split}-examples.arrow"),
            num_proc=num,
            desc=f"Tokenizing the {split} examples",
        )
        table = examples.with_format("arrow")[:]
        lengths = pc.list_value_length(table["input_ids"]).to_numpy()
        first_target = table["first_target"].to_numpy()
        n_long = int((lengths > block_size).sum())
        n_dropped = int((first_target >= block_size).sum())
        rows = examples.map(
            ExamplePacker(block_size, packing),
            batched=True,
            batch_size=map_batch_size,
            remove_columns=examples.column_names,
            features=example_features(packing),
            cache_file_name=str(tmp / f"{split}.arrow"),
            num_proc=num,
            desc=f"{'Packing' if packing else 'Truncating'} the {split} examples into rows of {block_size}",
        )
        n_tokens = int(np.minimum(lengths, block_size)[first_target < block_size].sum())
        summary = (
            f"{split}: {len(lengths)} examples -> {len(rows)} rows of at most {block_size} tokens "
            f"({n_tokens / max(len(rows) * block_size, 1):.1%} filled); {n_long} longer than block_size "
            f"truncated to their first {block_size} tokens, {n_dropped} dropped (no target token among them)"
        )
        (log.warning if n_long else log.info)(summary)
        if len(rows) == 0:
            raise ValueError(
                f"The {split!r} split has no example with a target token within block_size={block_size}: "
                "raise --data.block_size or shorten the prompts."
            )
        files = [os.path.relpath(f["filename"], tmp) for f in rows.cache_files]
        splits[split] = {
            "files": files,
            "num_blocks": len(rows),
            "num_examples": len(lengths),
            "num_truncated": n_long,
            "num_dropped": n_dropped,
        }
        del examples, rows, table
        for file in tmp.glob(f"{split}-examples*.arrow"):  # with num_proc, one file per process
            file.unlink()
    return splits


def add_row_numbers(raw: DatasetDict) -> DatasetDict:
    """Each split with its row numbers, so an error about an example names its row in the source."""
    return DatasetDict({split: ds.add_column(ROW_COLUMN, list(range(len(ds)))) for split, ds in raw.items()})


# The batch key of its real tokens (not padding), counted by the collators on the host as a plain int: reading
# it costs no device sync (progress bars, throughput). Lightning moves only tensors to the device.
REAL_TOKENS = "num_real_tokens"


def real_tokens(batch: Any) -> int:
    """The real (non-padding) tokens of a batch: its collator's count, else all of its input ids."""
    count = batch.get(REAL_TOKENS) if isinstance(batch, dict) else None
    return int(count) if count is not None else int(batch["input_ids"].numel())


def _counted(row: dict[str, Tensor], length: int) -> int:
    """``length``, or 0 for a row the padding machinery added (``sampling.PaddedBlocks``: no target)."""
    labels = row.get("labels")
    return 0 if labels is not None and bool((torch.as_tensor(labels) == IGNORE_INDEX).all()) else length


class PadCollator:
    """Rows of different lengths -> a batch right-padded to the longest: labels -100 and ``attention_mask`` 0
    on the padding (the mask also keeps the padding out of a mixture of experts' router loss).

    Position ids, when the rows have them (packed), go on over the padding from the row's last example,
    which the padding then joins: causal attention keeps it out of every real token's view.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Tensor]]) -> dict[str, Any]:
        length = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        positions = "position_ids" in rows[0]
        pos = torch.zeros((len(rows), length), dtype=torch.long)
        real = 0
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = row["input_ids"]
            labels[i, :n] = row["labels"]
            mask[i, :n] = 1
            real += _counted(row, n)
            if positions:
                pos[i, :n] = row["position_ids"]
                pos[i, n:] = pos[i, n - 1] + 1 + torch.arange(length - n)
        batch: dict[str, Any] = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if positions:
            batch["position_ids"] = pos
        batch[REAL_TOKENS] = real
        return batch


class BlockCollator:
    """Raw-text blocks (all of one length) -> a batch; ``labels`` kept when the rows have them (the padding
    blocks of ``sampling.PaddedBlocks``: all -100)."""

    def __call__(self, rows: list[dict[str, Tensor]]) -> dict[str, Any]:
        ids = torch.stack([torch.as_tensor(r["input_ids"]) for r in rows]).long()
        batch: dict[str, Any] = {"input_ids": ids}
        if "labels" in rows[0]:
            batch["labels"] = torch.stack([torch.as_tensor(r["labels"]) for r in rows]).long()
        batch[REAL_TOKENS] = sum(_counted(row, ids.shape[1]) for row in rows)
        return batch


class DocumentMaskingCollator(BlockCollator):
    """Raw-text blocks -> a batch where each EOS-separated document attends only to itself.

    Position ids restart after each EOS and the first token of each document is not a target, as for packed
    examples; computed per batch from the cached blocks, so the cache is the same with or without it. Labels
    that arrive with the rows are kept (a padding block's -100s): the document starts are masked on top.
    """

    def __init__(self, eos_token_id: int) -> None:
        self.eos_token_id = eos_token_id

    def __call__(self, rows: list[dict[str, Tensor]]) -> dict[str, Any]:
        batch = super().__call__(rows)
        return {**batch, **document_positions(batch["input_ids"], self.eos_token_id, batch.get("labels"))}


def document_positions(ids: Tensor, eos_token_id: int, labels: Tensor | None = None) -> dict[str, Tensor]:
    """``labels`` (default: the ids) with each document's first token masked, and ``position_ids`` that
    restart after each ``eos_token_id``."""
    start = torch.zeros_like(ids, dtype=torch.bool)
    start[:, 0] = True
    start[:, 1:] = ids[:, :-1] == eos_token_id
    index = torch.arange(ids.shape[1]).expand_as(ids)
    segment_start = torch.cummax(torch.where(start, index, 0), dim=1).values
    labels = ids if labels is None else labels
    return {"labels": labels.masked_fill(start, IGNORE_INDEX), "position_ids": index - segment_start}
