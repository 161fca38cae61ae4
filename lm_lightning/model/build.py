"""The model of a ``CausalLMModule``: its config; the model from pretrained weights or a config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from lm_lightning.model.lora import LoraSettings, apply_lora, check_qlora, quantization_kwargs
from lm_lightning.model.loss import unwrap_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_config(hp: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase | None) -> PretrainedConfig:
    """The config of the module's settings ``hp``, without building the model (no weights are loaded).

    From scratch, the vocabulary size and the BOS/EOS ids follow ``tokenizer`` unless ``model_config``
    sets them.
    """
    if hp["model_name_or_path"]:
        return AutoConfig.from_pretrained(hp["model_name_or_path"])
    overrides = dict(hp["model_config"] or {})
    if tokenizer is not None:
        overrides.setdefault("vocab_size", len(tokenizer))
        if tokenizer.eos_token_id is not None:
            overrides.setdefault("eos_token_id", tokenizer.eos_token_id)
            bos = tokenizer.bos_token_id  # 0 is an id, not a missing one
            overrides.setdefault("bos_token_id", tokenizer.eos_token_id if bos is None else bos)
    if hp["config_name"]:
        config = AutoConfig.from_pretrained(hp["config_name"], **overrides)
    else:
        config = AutoConfig.for_model(overrides.pop("model_type", "gpt2"), **overrides)
    if "vocab_size" not in overrides:
        raise ValueError(
            "Training from scratch needs the vocabulary size: give a tokenizer (--data.tokenizer) or "
            "--model.model_config.vocab_size."
        )
    return config


def model_kwargs(hp: Mapping[str, Any]) -> dict[str, Any]:
    """``from_pretrained``/``from_config`` arguments of the settings: dtype, attention implementation."""
    kwargs: dict[str, Any] = {}
    if hp["dtype"]:
        kwargs["dtype"] = DTYPES[hp["dtype"]]
    if hp["attn_implementation"]:
        kwargs["attn_implementation"] = hp["attn_implementation"]
    return kwargs


def build_model(
    hp: Mapping[str, Any],
    config: PretrainedConfig,
    lora: LoraSettings | None,
    device: torch.device,
    weights_follow: bool = False,
) -> nn.Module:
    """The model: pretrained weights (``model_name_or_path``) or random ones (from ``config``), with LoRA.

    ``weights_follow``: a checkpoint's weights replace them all, so the pretrained ones are not read.
    """
    kwargs = model_kwargs(hp)
    if hp["model_name_or_path"] and not (weights_follow and lora is None):
        check_qlora(lora, device.type, from_scratch=False)
        kwargs.update(quantization_kwargs(lora, device))
        model = AutoModelForCausalLM.from_pretrained(hp["model_name_or_path"], **kwargs)
    else:
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    return apply_lora(model, lora) if lora is not None else model


def prepare_model(model: nn.Module, gradient_checkpointing: bool, compile: bool) -> nn.Module:
    """Training mode, activation checkpointing and ``torch.compile`` as set."""
    model.train()  # from_pretrained returns eval mode, and Lightning 2.6 keeps each module's mode
    if gradient_checkpointing:
        unwrap_model(model).gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    if compile:
        # The chunked loss calls the trunk (base_model) and the head, never model.forward, so model.compile()
        # (which wraps forward) compiled nothing that ran. The trunk is compiled in place (parameter names,
        # and so checkpoints, stay the model's); the head and loss in causal_lm_loss(compile=True).
        unwrap_model(model).base_model.compile()
    return model
