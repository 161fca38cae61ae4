"""The data module's settings, checked when it is built: each error names the setting and what is valid."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
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


# What each data setting changes, for the cache key (``DataSettings.key``).
ROWS = "rows"  # the cached rows: part of the key
READ = "read"  # how the same cached rows are batched, evaluated or found: not part of the key
SOURCE = "source"  # the source, keyed by its files' or datasets' own fingerprint
TOKENIZER = "tokenizer"  # keyed by the tokenizer's own fingerprint
HOLD_OUT = "hold_out"  # part of the key when the validation rows are held out of local train files


def _setting(default: Any, effect: str = ROWS) -> Any:
    return field(default=default, metadata={"effect": effect})


@dataclass(frozen=True)
class DataSettings:
    """Every argument of ``CausalLMDataModule``, each marked with what it changes.

    The cache key is made of every setting marked ``ROWS`` (the default), so a new setting is in the key
    unless it is declared to leave the cached rows alone (tests/test_data.py checks that each argument of
    the data module is here).
    """

    tokenizer: Any = _setting(None, TOKENIZER)
    dataset_name: str | None = _setting(None, SOURCE)
    dataset_config_name: str | None = _setting(None, SOURCE)
    data_files: Any = _setting(None, SOURCE)
    corpus: str | None = _setting(None, SOURCE)
    dataset: Any = _setting(None, SOURCE)
    text_column: str = _setting("text")
    block_size: int | None = _setting(None)
    validation_split_percentage: float = _setting(5.0, HOLD_OUT)
    eos_between_texts: bool = _setting(False)
    train_tokenizer_vocab_size: int | None = _setting(None, TOKENIZER)
    batch_size: int = _setting(8, READ)
    eval_batch_size: int | None = _setting(None, READ)
    num_workers: int = _setting(0, READ)
    pin_memory: bool | None = _setting(None, READ)
    num_proc: int | None = _setting(None)  # fine-tuning examples are packed per process shard
    map_batch_size: int = _setting(1000)  # ... and per map batch (best-fit decreasing)
    cache_dir: str | None = _setting(None, READ)
    seed: int = _setting(42, HOLD_OUT)
    prompts: list[str] | None = _setting(None, READ)
    prompts_file: str | None = _setting(None, READ)
    streaming: bool = _setting(False)  # the train split is then not cached
    format: str = _setting("auto")
    completion_only_loss: bool = _setting(True)
    chat_template: str | None = _setting(None)  # keyed by the template's text, not its path
    packing: bool = _setting(False)
    document_masking: bool = _setting(False, READ)  # labels and positions made per batch
    eval_stride: int | None = _setting(None, READ)  # windows made from the cached stream
    skip_empty: bool = _setting(False)

    @classmethod
    def of(cls, arguments: dict[str, Any]) -> DataSettings:
        """The settings among ``arguments`` (a data module's ``locals()`` in its ``__init__``)."""
        return cls(**{f.name: arguments[f.name] for f in fields(cls)})

    def key(self, held_out: bool, **resolved: Any) -> dict[str, Any]:
        """The settings that change the cached rows, by name; ``resolved`` values replace the given ones
        (the block size taken from the tokenizer, the chat template's text). ``held_out``: the validation
        rows are held out of the train split, so the seed and share that choose them count too."""
        effects = (ROWS, HOLD_OUT) if held_out else (ROWS,)
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["effect"] in effects}
        return {**values, **{k: v for k, v in resolved.items() if k in values}}
