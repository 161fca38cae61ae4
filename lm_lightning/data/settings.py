"""The data module's settings, checked when it is built: each error names the setting and what is valid."""

from __future__ import annotations

from typing import Any


def check_data_settings(
    *,
    tokenizer: Any,
    train_tokenizer_vocab_size: int | None,
    block_size: int | None,
    validation_split_percentage: float,
    batch_sizes: dict[str, int | None],
    prompts: list[str] | None,
    prompts_file: str | None,
    streaming: bool,
    in_memory_or_builtin: bool,
) -> None:
    """Raise ``ValueError`` for settings that cannot work together or are out of range."""
    if tokenizer is not None and train_tokenizer_vocab_size is not None:
        raise ValueError(
            "Set at most one of tokenizer (a name or path, e.g. 'gpt2') and train_tokenizer_vocab_size "
            f"(train a BPE tokenizer on the data); got tokenizer={tokenizer!r}, "
            f"train_tokenizer_vocab_size={train_tokenizer_vocab_size!r}."
        )
    if block_size is not None and block_size < 2:
        raise ValueError(f"block_size={block_size} is too small: a block needs at least 2 tokens.")
    if not 0 < validation_split_percentage < 100:
        raise ValueError(f"validation_split_percentage={validation_split_percentage} must be in (0, 100).")
    for name, value in batch_sizes.items():
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} must be at least 1.")
    if prompts is not None and (
        isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p for p in prompts)
    ):
        raise ValueError(f"prompts={prompts!r} is invalid: give a list of non-empty strings.")
    if prompts is not None and prompts_file is not None:
        raise ValueError("Set prompts or prompts_file, not both.")
    if streaming and (in_memory_or_builtin or train_tokenizer_vocab_size):
        raise ValueError(
            "streaming=True reads a hub dataset (--data.dataset_name) or local files (--data.data_files) "
            "with a given tokenizer; in-memory datasets, built-in corpora and a tokenizer trained on the "
            "train split need the whole split: set --data.streaming false."
        )
