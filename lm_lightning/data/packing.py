"""Texts -> concatenated token ids cut into ``block_size`` blocks, and the on-disk cache of those blocks."""

from __future__ import annotations

import json
import os
from itertools import chain
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, Features, List, Value, concatenate_datasets
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from lm_lightning.io import atomic_path

# Bumped whenever the on-disk block format changes, so old caches are not read.
CACHE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class BlockPacker:
    """Tokenizes batches of texts and cuts their concatenation into ``block_size`` blocks.

    The tokens left over after the last full block of a batch are carried into the next batch, so a
    split loses at most one partial block at its very end (the reference ``group_texts`` drops a
    remainder per 1,000-row map batch). With ``num_proc`` > 1 each process packs its own contiguous
    shard, so at most one partial block per shard is dropped. Token ids are concatenated with NumPy,
    linear in the batch (the reference ``sum(lists, [])`` is quadratic).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        text_column: str,
        block_size: int,
        eos_between_texts: bool,
    ) -> None:
        # The tokenizer's own Rust backend, copied only when it would truncate or pad (see ``_encoder``).
        self.backend = tokenizer.backend_tokenizer
        self.text_column = text_column
        self.block_size = block_size
        self.eos_id = tokenizer.eos_token_id if eos_between_texts else None
        if eos_between_texts and self.eos_id is None:
            raise ValueError("eos_between_texts=True needs a tokenizer with an EOS token; this one has none.")
        self.carry = np.empty(0, dtype=np.int32)

    def __call__(self, batch: dict[str, list]) -> dict[str, np.ndarray]:
        texts = batch[self.text_column]
        # encode_batch_fast skips the character offsets that nothing here uses.
        ids = [enc.ids for enc in self._encoder().encode_batch_fast(texts)]
        if self.eos_id is not None:
            ids = [x + [self.eos_id] for x in ids if x]
        total = sum(map(len, ids))
        tokens = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=total)
        if self.carry.size:
            tokens = np.concatenate([self.carry, tokens])
        n_blocks = tokens.size // self.block_size
        cut = n_blocks * self.block_size
        self.carry = tokens[cut:].copy()
        return {"input_ids": tokens[:cut].reshape(n_blocks, self.block_size)}

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

    def count_tokens(self, texts: list[str]) -> int:
        """Number of tokens ``texts`` give, EOS separators included."""
        ids = [enc.ids for enc in self._encoder().encode_batch_fast(texts)]
        return sum(len(x) + (self.eos_id is not None and bool(x)) for x in ids)


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
) -> None:
    """Tokenize and pack every split of ``raw`` into ``path`` (written atomically, with a manifest)."""
    with atomic_path(path, directory=True) as tmp:
        manifest: dict = {"block_size": block_size, "splits": {}}
        for split, ds in raw.items():
            packer = BlockPacker(tokenizer, text_column, block_size, eos_between_texts)
            blocks = ds.map(
                packer,
                batched=True,
                batch_size=map_batch_size,
                remove_columns=ds.column_names,
                features=Features({"input_ids": List(Value("int32"), length=block_size)}),
                cache_file_name=str(tmp / f"{split}.arrow"),
                num_proc=num_proc if num_proc > 1 else None,
                desc=f"Tokenizing and packing {split} into blocks of {block_size}",
            )
            if len(blocks) == 0:
                n_tokens = packer.count_tokens(ds[text_column])
                raise ValueError(
                    f"The {split!r} split has {n_tokens} tokens, fewer than one block "
                    f"(block_size={block_size}): lower --data.block_size or give more text."
                )
            files = [os.path.relpath(f["filename"], tmp) for f in blocks.cache_files]
            manifest["splits"][split] = {"files": files, "num_blocks": len(blocks)}
            del blocks
        write_manifest(tmp, block_size, "text", manifest["splits"])


def read_block_cache(path: Path) -> tuple[dict[str, Dataset], str]:
    """The cached splits, memory-mapped, as torch-formatted datasets, and their data format.

    Blocks of text have ``input_ids``; fine-tuning examples (``lm_lightning.data.examples``) also ``labels``
    and, packed, ``position_ids``.
    """
    manifest = json.loads((path / MANIFEST).read_text())
    splits = {}
    for split, info in manifest["splits"].items():
        parts = [Dataset.from_file(str(path / f)) for f in info["files"]]
        ds = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
        splits[split] = ds.with_format("torch")
    return splits, manifest.get("format", "text")


def write_manifest(tmp: Path, block_size: int, data_format: str, splits: dict) -> None:
    """The cache's manifest: written last, its presence marks the cache complete."""
    manifest = {"block_size": block_size, "format": data_format, "splits": splits}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))


def default_cache_root() -> Path:
    """Where packed blocks and trained tokenizers are cached: ``$HF_DATASETS_CACHE/lm_lightning``."""
    from datasets import config

    return Path(config.HF_DATASETS_CACHE) / "lm_lightning"
