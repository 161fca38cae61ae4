"""FSDP wrap policy: one FSDP unit (and one activation checkpoint) per transformer block, any HF model.

The model is built in ``CausalLMModule.configure_model``, after the strategy exists, so the block class
cannot be named in the strategy's arguments without hard-coding one architecture. Instead the policy is a
function that FSDP calls on each module: a module is a transformer block when its class is listed in the
``_no_split_modules`` of the Hugging Face ``PreTrainedModel`` defined beside it (``GPT2Block`` for GPT-2,
``LlamaDecoderLayer`` for Llama, ...: the list ``accelerate``'s ``device_map`` uses for the same purpose).
A YAML config names it by import path, so ``--print_config`` shows it as written::

    strategy:
      class_path: lightning.pytorch.strategies.FSDPStrategy
      init_args:
        auto_wrap_policy: lm_lightning.model.parallel.transformer_block_policy
        activation_checkpointing_policy: lm_lightning.model.parallel.transformer_block_policy
"""

from __future__ import annotations

import functools
import inspect
import sys

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


@functools.cache
def is_transformer_block_class(cls: type[nn.Module]) -> bool:
    """Whether a ``PreTrainedModel`` of ``cls``'s own modeling file lists ``cls`` in ``_no_split_modules``."""
    module = sys.modules.get(cls.__module__)
    if module is None:
        return False
    for _, obj in inspect.getmembers(module, inspect.isclass):
        if issubclass(obj, PreTrainedModel) and cls.__name__ in (
            getattr(obj, "_no_split_modules", None) or []
        ):
            return True
    return False


def transformer_block_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP ``auto_wrap_policy``: descend everywhere, wrap (or checkpoint) the transformer blocks only."""
    if recurse:
        return True
    return is_transformer_block_class(type(module))


def transformer_block_classes(config: PretrainedConfig) -> set[type[nn.Module]]:
    """The block classes the policy selects in the model of ``config`` (built on the meta device)."""
    from lm_lightning.model.flops import meta_model

    return {type(m) for m in meta_model(config).modules() if is_transformer_block_class(type(m))}
