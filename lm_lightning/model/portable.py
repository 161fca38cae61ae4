"""Checkpoints that travel: the model's config and its tokenizer inside, as plain data.

A checkpoint of a fully trained model is then all that ``export``, ``predict`` and ``validate`` need: the
model is built from the stored config and loaded with the checkpoint's own weights, with no hub, no cache, no
tokenizer folder and no base weights read first. (A LoRA checkpoint holds the adapters only: its base model
is needed where it is loaded.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from lm_lightning.data.tokenizer import tokenizer_from_data, tokenizer_to_data
from lm_lightning.model.sharded import META_FILE, is_sharded_checkpoint

CONFIG_KEY = "lm_lightning_model_config"
TOKENIZER_KEY = "lm_lightning_tokenizer"


def add_portable_parts(
    checkpoint: dict[str, Any], config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase | None
) -> None:
    """Store the full model config and the tokenizer in ``checkpoint`` (plain data: ``weights_only``-safe)."""
    checkpoint[CONFIG_KEY] = json.loads(config.to_json_string(use_diff=False))
    if tokenizer is not None:
        checkpoint[TOKENIZER_KEY] = tokenizer_to_data(tokenizer)


def portable_parts(
    checkpoint: dict[str, Any],
) -> tuple[PretrainedConfig | None, PreTrainedTokenizerBase | None]:
    """The config and tokenizer stored by :func:`add_portable_parts` (``None`` for older checkpoints)."""
    config = tokenizer = None
    if (data := checkpoint.get(CONFIG_KEY)) is not None:
        data = dict(data)
        config = AutoConfig.for_model(data.pop("model_type"), **data)
    if (data := checkpoint.get(TOKENIZER_KEY)) is not None:
        tokenizer = tokenizer_from_data(data)
    return config, tokenizer


def read_portable_parts(
    path: str | os.PathLike,
) -> tuple[PretrainedConfig | None, PreTrainedTokenizerBase | None]:
    """:func:`portable_parts` of a checkpoint file or sharded folder; its tensors are memory-mapped."""
    if is_sharded_checkpoint(path):  # FSDP2: all but the weights and optimizer state are in meta.pt
        path = Path(path) / META_FILE
    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return portable_parts(checkpoint)


def model_from_checkpoint(
    config: PretrainedConfig, checkpoint: dict[str, Any], **kwargs: Any
) -> PreTrainedModel:
    """The causal LM of ``config`` with the checkpoint's ``model.*`` tensors, and no random initialisation.

    ``from_pretrained(None, config=..., state_dict=...)``: unlike building on the meta device and loading
    with ``assign=True``, it also computes the buffers that are not saved (rotary frequencies, scales).
    """
    state_dict = {k[6:]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return cls.from_pretrained(None, config=config, state_dict=state_dict, **kwargs)
