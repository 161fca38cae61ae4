"""Preference pairs (trl's format) -> rows of a chosen and a rejected sequence, their cache, their batches.

The columns, as trl's ``DPOTrainer`` reads them:

- ``prompt``, ``chosen`` and ``rejected`` strings: each side is the prompt and its completion, tokenized as
  prompt-completion examples are (``formats.encode_prompt_completion``: the prompt with its special tokens,
  the completion without, EOS after it); the completion and its EOS are the targets.
- chats: ``chosen`` and ``rejected`` lists of messages that share the conversation up to the answers (trl's
  implicit prompt: their longest common beginning), or a ``prompt`` list of messages and ``chosen`` /
  ``rejected`` lists of the answer turns. Each side is rendered by the chat template
  (``formats.encode_chat``); the targets are its assistant turns after the shared conversation.

A row holds both sides (``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``,
``rejected_labels``) and its ``pair_id``, so a pair never straddles two micro-batches or processes; a batch
of ``B`` rows is ``2B`` sequences, the ``B`` chosen ones first (trl's layout). A side longer than
``block_size`` is truncated to its first ``block_size`` tokens, and a pair either side of which has no target
among them is dropped; both are counted and logged. Pairs are not packed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from datasets import DatasetDict, Features, List, Value
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lm_lightning.data.examples import PadCollator, write_example_cache
from lm_lightning.data.formats import (
    IGNORE_INDEX,
    NO_TARGET,
    ROW_COLUMN,
    chat_template_of,
    check_messages,
    encode_chat,
    encode_prompt_completion,
)
from lm_lightning.data.packing import write_manifest
from lm_lightning.io import atomic_path

log = logging.getLogger(__name__)
SIDES = ("chosen", "rejected")


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, row: dict[str, Any], template: str | None, where: str
) -> dict[str, list[int]]:
    """``{side}_input_ids`` and ``{side}_labels`` of both sides of a pair; a ``ValueError`` for a bad row."""
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, str) != isinstance(rejected, str) and chosen and rejected:
        raise ValueError(
            f"{where}: 'chosen' and 'rejected' must both be texts or both chats (message lists)."
        )
    if isinstance(chosen, str) or isinstance(rejected, str):
        for side in SIDES:
            if not isinstance(row[side], str) or not row[side].strip():
                raise ValueError(f"{where}: {side!r} is empty ({row[side]!r:.80}): a pair needs two answers.")
        if prompt is None:
            raise ValueError(
                f"{where}: text pairs need a 'prompt' column (chats may leave it in the shared conversation)."
            )
        if chosen == rejected:
            raise ValueError(
                f"{where}: 'chosen' equals 'rejected' ({chosen!r:.80}): the pair prefers nothing."
            )
        encoded = {
            side: encode_prompt_completion(tokenizer, prompt, row[side], True, where) for side in SIDES
        }
    else:
        encoded = _encode_chat_pair(tokenizer, chosen, rejected, prompt, template, where)
    out: dict[str, list[int]] = {}
    for side, (ids, labels) in encoded.items():
        out[f"{side}_input_ids"], out[f"{side}_labels"] = ids, labels
    return out


def _encode_chat_pair(
    tokenizer: PreTrainedTokenizerBase,
    chosen: Any,
    rejected: Any,
    prompt: Any,
    template: str | None,
    where: str,
) -> dict[str, tuple[list[int], list[int]]]:
    if template is None:
        raise ValueError(f"{where}: chat pairs need a chat template.")
    if prompt is not None:
        check_messages(prompt, f"{where}, 'prompt'", need_assistant=False)
        sides = {"chosen": [*prompt, *(chosen or [])], "rejected": [*prompt, *(rejected or [])]}
        shared = len(prompt)
    else:
        sides = {"chosen": chosen, "rejected": rejected}
        shared = 0
        while shared < min(len(chosen or []), len(rejected or [])) and chosen[shared] == rejected[shared]:
            shared += 1
    for side, messages in sides.items():
        check_messages(messages, f"{where}, {side!r}")
    if sides["chosen"] == sides["rejected"]:
        raise ValueError(f"{where}: 'chosen' equals 'rejected': the pair prefers nothing.")
    for side, messages in sides.items():
        answers = [m for m in messages[shared:] if m["role"] == "assistant"]
        if not any(m["content"].strip() for m in answers):
            raise ValueError(
                f"{where}: {side!r} has no assistant answer after the shared conversation (or only empty "
                "ones): a pair needs two answers."
            )
    return {
        side: encode_chat(tokenizer, messages, template, True, f"{where}, {side!r}", first_trained=shared)
        for side, messages in sides.items()
    }


class PairEncoder:
    """A ``datasets.map(batched=True)`` callable: preference rows -> both sides' ids and labels, and the index
    of each side's first target (``NO_TARGET`` if none)."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, chat_template: str | None, source_split: str
    ) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.source_split = source_split
        self._template: str | None = None

    def template(self) -> str:
        """The chat template, looked up on the first chat (text pairs need none)."""
        if self._template is None:
            self._template = chat_template_of(self.tokenizer, self.chat_template)
        return self._template

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        columns = [c for c in ("prompt", *SIDES) if c in batch]
        out: dict[str, list] = {f"{s}_{k}": [] for s in SIDES for k in ("input_ids", "labels", "first")}
        for j, row in enumerate(batch[ROW_COLUMN]):
            where = f"The {self.source_split!r} split, row {row} (counting from 0)"
            values = {c: batch[c][j] for c in columns}
            is_chat = not isinstance(values["chosen"], str) or not isinstance(values["rejected"], str)
            encoded = encode_pair(self.tokenizer, values, self.template() if is_chat else None, where)
            for side in SIDES:
                labels = encoded[f"{side}_labels"]
                out[f"{side}_input_ids"].append(encoded[f"{side}_input_ids"])
                out[f"{side}_labels"].append(labels)
                targets = (i for i, t in enumerate(labels) if i and t != IGNORE_INDEX)
                out[f"{side}_first"].append(next(targets, NO_TARGET))
        return out


class PairTruncator:
    """A ``datasets.map(batched=True, with_indices=True)`` callable: pairs with a target on each side within
    ``block_size``, each side cut to ``block_size`` tokens, and their ``pair_id`` (the pair's index in the
    split's encoded pairs: the key of precomputed reference log-probabilities)."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        n = self.block_size
        keep = [
            j for j in range(len(indices)) if max(batch["chosen_first"][j], batch["rejected_first"][j]) < n
        ]
        out = {
            f"{s}_{k}": [batch[f"{s}_{k}"][j][:n] for j in keep]
            for s in SIDES
            for k in ("input_ids", "labels")
        }
        out["pair_id"] = [indices[j] for j in keep]
        return out


def pair_features() -> Features:
    """The cached columns of preference rows."""
    columns = {f"{s}_{k}": List(Value("int32")) for s in SIDES for k in ("input_ids", "labels")}
    return Features({**columns, "pair_id": Value("int64")})


def write_pair_cache(
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
    """Encode and truncate the pairs of every split of ``raw`` into the cache folder ``path`` (atomically);
    the arguments are ``examples.write_example_cache``'s."""
    if packing:
        raise ValueError(
            "packing=True packs examples; preference pairs are not packed: set --data.packing false."
        )
    if not completion_only_loss:
        raise ValueError(
            "completion_only_loss=False: preference tuning scores the answers only (their log-probabilities "
            "given the prompt): set --data.completion_only_loss true."
        )
    num = num_proc if num_proc > 1 else None
    with atomic_path(path, directory=True) as tmp:
        splits: dict[str, Any] = {}
        for split, ds in raw.items():
            source_split = "train" if held_out and split == "validation" else split
            pairs = ds.map(
                PairEncoder(tokenizer, chat_template, source_split),
                batched=True,
                batch_size=map_batch_size,
                remove_columns=ds.column_names,
                cache_file_name=str(tmp / f"{split}-pairs.arrow"),
                num_proc=num,
                desc=f"Tokenizing the {split} pairs",
            )
            table = pairs.with_format("arrow")[:]
            lengths = np.maximum(*(pc.list_value_length(table[f"{s}_input_ids"]).to_numpy() for s in SIDES))
            first = np.maximum(*(table[f"{s}_first"].to_numpy() for s in SIDES))
            rows = pairs.map(
                PairTruncator(block_size),
                batched=True,
                batch_size=map_batch_size,
                with_indices=True,
                remove_columns=pairs.column_names,
                features=pair_features(),
                cache_file_name=str(tmp / f"{split}.arrow"),
                num_proc=num,
                desc=f"Truncating the {split} pairs to {block_size} tokens a side",
            )
            n_long, n_dropped = int((lengths > block_size).sum()), int((first >= block_size).sum())
            summary = (
                f"{split}: {len(lengths)} pairs -> {len(rows)} rows of two sequences of at most {block_size} "
                f"tokens; {n_long} with a side longer than block_size truncated to its first {block_size} "
                f"tokens, {n_dropped} dropped (a side with no target token among them)"
            )
            (log.warning if n_long else log.info)(summary)
            if len(rows) == 0:
                raise ValueError(
                    f"The {split!r} split has no pair with a target token on both sides within "
                    f"block_size={block_size}: raise --data.block_size or shorten the prompts."
                )
            splits[split] = {
                "files": [os.path.relpath(f["filename"], tmp) for f in rows.cache_files],
                "num_blocks": len(rows),
                "num_examples": len(lengths),
                "num_truncated": n_long,
                "num_dropped": n_dropped,
            }
            del pairs, rows, table
            for file in tmp.glob(f"{split}-pairs*.arrow"):  # with num_proc, one file per process
                file.unlink()
        write_manifest(tmp, block_size, data_format, splits)


class PairCollator:
    """Preference rows -> a batch of ``2B`` sequences right-padded to the longest (``PadCollator``), the ``B``
    chosen sides first, and the rows' ``pair_id``."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = PadCollator(pad_token_id)

    def __call__(self, rows: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        sides = [{"input_ids": r[f"{s}_input_ids"], "labels": r[f"{s}_labels"]} for s in SIDES for r in rows]
        batch = self.pad(sides)
        batch["pair_id"] = torch.as_tensor([int(r["pair_id"]) for r in rows], dtype=torch.long)
        return batch


def example_cache_writer(data_format: str) -> Callable[..., None]:
    """The cache writer of fine-tuning data of this format: ``write_pair_cache`` for preference pairs, else
    ``examples.write_example_cache`` (the same arguments)."""
    return write_pair_cache if data_format == "preference" else write_example_cache


def example_collator(data_format: str, pad_token_id: int) -> PadCollator | PairCollator:
    """The collator of fine-tuning rows of this format."""
    return PairCollator(pad_token_id) if data_format == "preference" else PadCollator(pad_token_id)
