"""Loading, training and fingerprinting tokenizers."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from itertools import chain
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lm_lightning.data.sources import fingerprint
from lm_lightning.io import atomic_path

EOS_TOKEN = "<|endoftext|>"
# Files of a model folder that never change how text is tokenized, and are too large to hash quickly.
_WEIGHT_SUFFIXES = frozenset(
    {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf"}
)


def load_tokenizer(name_or_path: str | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Return a fast tokenizer from a hub name, a local folder, or a tokenizer object as is.

    GPT-2 style tokenizers have no pad token; the EOS token is used for padding (it is never a target
    in packed blocks, and generation passes an attention mask).
    """
    if isinstance(name_or_path, PreTrainedTokenizerBase):
        tokenizer = name_or_path
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, use_fast=True)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"tokenizer={name_or_path!r} could not be loaded: give a Hugging Face hub name (needs the "
                f"network, e.g. 'gpt2') or a local folder holding tokenizer.json or tokenizer_config.json. "
                f"Cause: {err}"
            ) from err
    if not tokenizer.is_fast:
        raise ValueError(f"tokenizer={name_or_path!r} has no fast (Rust) implementation; one is required.")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything that decides the token ids a tokenizer produces."""
    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps([tokenizer.eos_token, tokenizer.bos_token, len(tokenizer)]).encode())
    return h.hexdigest()[:16]


def tokenizer_files_fingerprint(folder: str | os.PathLike) -> str:
    """A hash of a tokenizer folder's files and of the library versions that read them, without loading it.

    Loading GPT-2's tokenizer takes about a second (transformers parses its JSON files in Python);
    hashing its 4.8 MB of files takes about 10 ms. Weight files are skipped: they do not tokenize.
    """
    import tokenizers
    import transformers

    h = hashlib.sha256(json.dumps([transformers.__version__, tokenizers.__version__]).encode())
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and path.suffix not in _WEIGHT_SUFFIXES:
            h.update(json.dumps([path.name, path.stat().st_size]).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, save_dir: str | os.PathLike
) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE tokenizer on ``texts`` and save it to ``save_dir``.

    The folder is written atomically: it appears complete or not at all.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=1024,
    )
    with atomic_path(save_dir, directory=True) as tmp:
        tokenizer.save_pretrained(tmp)
    return load_tokenizer(str(save_dir))


def cached_bpe_tokenizer(
    train: Dataset, text_column: str, vocab_size: int, cache_root: str | os.PathLike
) -> tuple[PreTrainedTokenizerFast, str]:
    """A BPE tokenizer trained on ``train``'s texts, and its folder, cached by the data's fingerprint."""
    key = fingerprint([train._fingerprint, text_column, vocab_size])
    path = Path(cache_root) / "tokenizers" / f"bpe{vocab_size}-{key}"
    if (path / "tokenizer.json").exists():
        return load_tokenizer(str(path)), str(path)
    batches = (b[text_column] for b in train.iter(batch_size=1000))
    return train_bpe_tokenizer(chain.from_iterable(batches), vocab_size, path), str(path)


def find_tokenizer(pl_module: Any, trainer: Any = None) -> PreTrainedTokenizerBase | None:
    """The tokenizer a LightningModule works with: its own ``tokenizer``, else its data module's."""
    tokenizer = getattr(pl_module, "tokenizer", None)
    if tokenizer is None and trainer is not None:
        tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
    return tokenizer


_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def tokenizer_to_data(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """A fast tokenizer as plain data (strings, numbers, lists, dicts), to travel inside a checkpoint.

    Plain data, not files: ``torch.load(weights_only=True)`` accepts it, and no folder needs to exist where
    the checkpoint is loaded. :func:`tokenizer_from_data` rebuilds it with the same ids.
    """
    return {
        "format": 1,
        "tokenizer_json": tokenizer.backend_tokenizer.to_str(),  # vocab, merges, added tokens, processors
        "special_tokens": {k: str(getattr(tokenizer, k)) for k in _SPECIAL_TOKENS if getattr(tokenizer, k)},
        "extra_special_tokens": [str(t) for t in getattr(tokenizer, "extra_special_tokens", None) or []],
        "chat_template": tokenizer.chat_template,
        "model_max_length": int(min(tokenizer.model_max_length, 2**62)),
        "padding_side": tokenizer.padding_side,
        "truncation_side": tokenizer.truncation_side,
        "clean_up_tokenization_spaces": bool(tokenizer.clean_up_tokenization_spaces),
    }


def tokenizer_from_data(data: dict[str, Any]) -> PreTrainedTokenizerFast:
    """The tokenizer that :func:`tokenizer_to_data` described."""
    from tokenizers import Tokenizer

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(data["tokenizer_json"]),
        **data["special_tokens"],
        model_max_length=data["model_max_length"],
        padding_side=data["padding_side"],
        truncation_side=data["truncation_side"],
        clean_up_tokenization_spaces=data["clean_up_tokenization_spaces"],
        chat_template=data["chat_template"],
    )
    if data["extra_special_tokens"]:
        tokenizer.add_special_tokens({"additional_special_tokens": data["extra_special_tokens"]})
    return load_tokenizer(tokenizer)
