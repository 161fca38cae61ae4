"""Texts -> concatenated token ids cut into ``block_size`` blocks, and the on-disk cache of those blocks."""

from __future__ import annotations

import json
import os
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, DatasetDict, Features, List, Value, concatenate_datasets
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from lm_lightning.io import atomic_path

# Bumped whenever the on-disk block format changes, so old caches are not read. 2: each split's tail (the
# tokens after its last full block) is kept, and the blocks no longer depend on num_proc.
CACHE_FORMAT_VERSION = 2
MANIFEST = "manifest.json"


class BlockPacker:
    """Tokenizes batches of texts and cuts their concatenation into ``block_size`` blocks.

    The tokens left over after the last full block of a batch are carried into the next batch (``carry``),
    so the blocks are the split's token stream cut every ``block_size`` tokens, and ``carry`` ends as the
    split's tail (the reference ``group_texts`` drops a remainder per 1,000-row map batch). Token ids are
    concatenated with NumPy, linear in the batch (the reference ``sum(lists, [])`` is quadratic).

    A text that is not a string (a null value) raises, naming the column; ``skip_empty`` skips it instead.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        text_column: str,
        block_size: int,
        eos_between_texts: bool,
        skip_empty: bool = False,
        split: str = "train",
    ) -> None:
        # The tokenizer's own Rust backend, copied only when it would truncate or pad (see ``_encoder``).
        self.backend = tokenizer.backend_tokenizer
        self.text_column = text_column
        self.block_size = block_size
        self.eos_id = tokenizer.eos_token_id if eos_between_texts else None
        if eos_between_texts and self.eos_id is None:
            raise ValueError("eos_between_texts=True needs a tokenizer with an EOS token; this one has none.")
        self.skip_empty = skip_empty
        self.split = split
        self.carry = np.empty(0, dtype=np.int32)

    def __call__(self, batch: dict[str, list]) -> dict[str, np.ndarray]:
        return self.cut(self.encode(batch[self.text_column]))

    def encode(self, texts: list[Any]) -> np.ndarray:
        """The token ids of ``texts``, concatenated (with EOS after each non-empty one when set)."""
        if not all(isinstance(text, str) for text in texts):
            if not self.skip_empty:
                bad = next(text for text in texts if not isinstance(text, str))
                raise ValueError(
                    f"The {self.split!r} split: text_column={self.text_column!r} holds a "
                    f"{type(bad).__name__} value ({bad!r:.40}), not a string. Fix the data, or set "
                    "--data.skip_empty true to skip such rows."
                )
            texts = [text for text in texts if isinstance(text, str)]
        # encode_batch_fast skips the character offsets that nothing here uses.
        ids = [enc.ids for enc in self._encoder().encode_batch_fast(texts)]
        if self.eos_id is not None:
            ids = [x + [self.eos_id] for x in ids if x]
        total = sum(map(len, ids))
        return np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=total)

    def cut(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """The full blocks of ``carry`` + ``tokens``; the tokens after the last one become ``carry``."""
        if self.carry.size:
            tokens = np.concatenate([self.carry, tokens])
        n_blocks = tokens.size // self.block_size
        cut = n_blocks * self.block_size
        self.carry = tokens[cut:].copy()
        return {"input_ids": tokens[:cut].reshape(n_blocks, self.block_size)}

    def pieces(self, batch: dict[str, list]) -> dict[str, list[np.ndarray]]:
        """A batch's own tokens in rows of ``block_size``, the remainder a last, shorter row (no carry).

        With ``num_proc`` > 1 each process packs its own shard of the texts; in rows like these, nothing is
        dropped at a shard's end, and :meth:`rejoin` (in one process) makes the split's blocks of them.
        """
        tokens = self.encode(batch[self.text_column])
        return {"input_ids": np.split(tokens, range(self.block_size, tokens.size, self.block_size))}

    def rejoin(self, table: pa.Table) -> dict[str, np.ndarray]:
        """:meth:`cut` over an Arrow batch of :meth:`pieces` rows, in order."""
        return self.cut(table.column("input_ids").combine_chunks().flatten().to_numpy())

    def _encoder(self) -> Tokenizer:
        """The Rust tokenizer, never truncating or padding.

        A tokenizer.json may enable truncation, and a call such as ``tokenizer(..., truncation=True)``
        leaves it enabled on the shared backend: either would cut long texts silently. Then a private
        copy is made; otherwise the shared backend is used as is, because a copy costs a JSON round
        trip (about 0.5 s for GPT-2's 3.5 MB tokenizer.json).
        """
        if self.backend.truncation is not None or self.backend.padding is not None:
            self.backend = Tokenizer.from_str(self.backend.to_str())
            self.backend.no_truncation()
            self.backend.no_padding()
        return self.backend


def is_cached(path: Path) -> bool:
    """Whether ``path`` holds a complete block cache."""
    return (path / MANIFEST).exists()


def write_block_cache(
    raw: DatasetDict,
    path: Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    text_column: str,
    block_size: int,
    eos_between_texts: bool,
    map_batch_size: int,
    num_proc: int,
    skip_empty: bool = False,
    short_ok: frozenset[str] = frozenset(),
) -> None:
    """Tokenize and pack every split of ``raw`` into ``path`` (written atomically, with a manifest).

    Each split is its token stream cut into blocks, and the tail after the last block (in the manifest):
    the same whatever ``num_proc``. A split shorter than one block raises, unless it is in ``short_ok`` (an
    evaluation split read by strided windows, which need no full block).
    """
    with atomic_path(path, directory=True) as tmp:
        splits: dict[str, Any] = {}
        for split, ds in raw.items():
            packer = BlockPacker(tokenizer, text_column, block_size, eos_between_texts, skip_empty, split)
            blocks = _pack_split(ds, packer, tmp, split, map_batch_size, num_proc)
            tail = packer.carry.tolist()
            if len(blocks) == 0 and split not in short_ok:
                raise ValueError(short_split_message(split, len(tail), block_size))
            files = [os.path.relpath(f["filename"], tmp) for f in blocks.cache_files]
            num_tokens = len(blocks) * block_size + len(tail)
            splits[split] = {"files": files, "num_blocks": len(blocks), "num_tokens": num_tokens}
            splits[split]["tail"] = tail
            del blocks
        write_manifest(tmp, block_size, "text", splits)


def _pack_split(
    ds: Dataset, packer: BlockPacker, tmp: Path, split: str, map_batch_size: int, num_proc: int
) -> Dataset:
    """The split's blocks (``packer.carry`` then holds its tail)."""
    block_size = packer.block_size
    features = Features({"input_ids": List(Value("int32"), length=block_size)})
    description = f"Tokenizing and packing {split} into blocks of {block_size}"
    if num_proc <= 1:  # one process: its packer carries the remainder from batch to batch, and keeps the tail
        return ds.map(
            packer, batched=True, batch_size=map_batch_size, remove_columns=ds.column_names,
            features=features, cache_file_name=str(tmp / f"{split}.arrow"), desc=description,
        )  # fmt: skip
    pieces = ds.map(
        packer.pieces, batched=True, batch_size=map_batch_size, remove_columns=ds.column_names,
        features=Features({"input_ids": List(Value("int32"))}), num_proc=num_proc,
        cache_file_name=str(tmp / f"{split}-pieces.arrow"), desc=f"Tokenizing {split}",
    )  # fmt: skip
    blocks = pieces.with_format("arrow").map(
        packer.rejoin, batched=True, batch_size=1000, remove_columns=pieces.column_names, features=features,
        cache_file_name=str(tmp / f"{split}.arrow"), desc=f"Packing {split} into blocks of {block_size}",
    )  # fmt: skip
    del pieces
    for file in tmp.glob(f"{split}-pieces*.arrow"):  # one file per process
        file.unlink()
    return blocks.with_format(None)


def check_short_splits(
    splits: dict[str, Dataset], tails: dict[str, torch.Tensor], block_size: int, strided: bool
) -> None:
    """Raise for a cached split with no full block, unless it is an evaluation split read by strided windows
    (a cache written by a strided run may hold one)."""
    for split, blocks in splits.items():
        if len(blocks) == 0 and not (strided and split != "train"):
            raise ValueError(short_split_message(split, len(tails[split]), block_size))


def short_split_message(split: str, n_tokens: int, block_size: int) -> str:
    """The error of a split with no full block."""
    return (
        f"The {split!r} split has {n_tokens} tokens, fewer than one block (block_size={block_size}): lower "
        "--data.block_size or give more text (an evaluation split may be shorter with --data.eval_stride)."
    )


def read_block_cache(path: Path) -> tuple[dict[str, Dataset], str, dict[str, torch.Tensor]]:
    """The cached splits, memory-mapped, as torch-formatted datasets; their data format; and the tail of each
    text split (the tokens after its last block: empty for fine-tuning examples).

    Blocks of text have ``input_ids``; fine-tuning examples (``lm_lightning.data.examples``) also ``labels``
    and, packed, ``position_ids``.
    """
    manifest = json.loads((path / MANIFEST).read_text())
    splits, tails = {}, {}
    for split, info in manifest["splits"].items():
        parts = [Dataset.from_file(str(path / f)) for f in info["files"]]
        ds = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
        splits[split] = ds.with_format("torch")
        tails[split] = torch.tensor(info.get("tail", []), dtype=torch.int32)
    return splits, manifest.get("format", "text"), tails


def write_manifest(tmp: Path, block_size: int, data_format: str, splits: dict) -> None:
    """The cache's manifest: written last, its presence marks the cache complete."""
    manifest = {"block_size": block_size, "format": data_format, "splits": splits}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))


def default_cache_root() -> Path:
    """Where packed blocks and trained tokenizers are cached: ``$HF_DATASETS_CACHE/lm_lightning``."""
    from datasets import config

    return Path(config.HF_DATASETS_CACHE) / "lm_lightning"
