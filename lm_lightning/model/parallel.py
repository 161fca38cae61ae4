"""Sharding: the transformer-block policy of any HF model, and FSDP2 (``fully_shard``) over it.

The model is built in ``CausalLMModule.configure_model``, after the strategy exists, so the block class
cannot be named in the strategy's arguments without hard-coding one architecture. Instead a module is a
transformer block when its class is listed in the ``_no_split_modules`` of the Hugging Face
``PreTrainedModel`` defined beside it (``GPT2Block`` for GPT-2, ``LlamaDecoderLayer`` for Llama, ...: the list
``accelerate``'s ``device_map`` uses for the same purpose). :func:`shard_model` makes each such block one
FSDP2 unit (and one activation checkpoint); :func:`transformer_block_policy` is the same choice as an
``auto_wrap_policy`` for torch's other wrappers (``apply_activation_checkpointing``).
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
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


def shard_model(
    build_empty: Callable[[], PreTrainedModel],
    load_full: Callable[[], PreTrainedModel],
    mesh: DeviceMesh,
    device: torch.device,
    *,
    is_rank_zero: bool,
    mixed_precision: bool = False,
    cpu_offload: bool = False,
    gradient_checkpointing: bool = False,
) -> PreTrainedModel:
    """A Hugging Face model sharded with FSDP2 (``fully_shard``) over ``mesh``, with ``load_full``'s weights.

    Every process builds the model on the meta device (no memory), shards each transformer block (the
    classes of :func:`is_transformer_block_class`) and then the root, and allocates its own shards only.
    Rank 0 alone builds the full model (``load_full``: pretrained or freshly initialised weights) and
    broadcasts it into the shards, so N processes never hold N full copies. With ``mixed_precision`` the
    blocks compute in bf16 and reduce gradients in fp32; ``cpu_offload`` keeps shards and optimizer state in
    host memory.
    """
    with torch.device("meta"):
        model = build_empty()
    if gradient_checkpointing:  # before fully_shard: the recomputation then sits inside each block's unit
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kwargs: dict[str, Any] = {"mesh": mesh}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for module in model.modules():
        if is_transformer_block_class(type(module)):
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    model.to_empty(device="cpu" if cpu_offload else device)
    whole = load_full() if is_rank_zero else None
    full = whole.state_dict() if whole is not None else {}
    # Collective: rank 0's full tensors are broadcast, each process keeps its own shard of them.
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=options)
    del full
    model.tie_weights()
    _broadcast_non_persistent_buffers(model, whole)
    return model


def _broadcast_non_persistent_buffers(model: nn.Module, whole: nn.Module | None) -> None:
    """Copy the buffers that no state dict holds (rotary ``inv_freq``) from rank 0's model to every rank.

    ``to_empty`` left them uninitialised; ``whole`` is rank 0's fully built model (``None`` elsewhere).
    """
    persistent = set(model.state_dict())
    for name, buffer in model.named_buffers():
        if name not in persistent:
            if whole is not None:
                buffer.copy_(whole.get_buffer(name))
            torch.distributed.broadcast(buffer, src=0)


def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of an FSDP2 model on CPU, on rank 0 (``{}`` elsewhere).

    A collective: every process must call it.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def check_whole_parameters(trainer: Any, what: str) -> None:
    """Refuse a strategy that shards parameters across processes, for ``what`` (``"X generates"``): a callback
    that runs the whole model on the global-zero process alone, while the others go on."""
    strategy = trainer.strategy
    sharded = isinstance(strategy, FSDPStrategy | ModelParallelStrategy)
    sharded = sharded or getattr(strategy, "zero_stage_3", False)
    if sharded and trainer.world_size > 1:
        raise ValueError(
            f"{what} on the global-zero process alone, which cannot run a model whose parameters "
            f"{type(strategy).__name__} shards across {trainer.world_size} processes: remove the callback or "
            "use a strategy that keeps whole parameters (ddp)."
        )


def is_sharded(model: nn.Module | None) -> bool:
    """Whether ``model`` was sharded with ``fully_shard``."""
    return isinstance(model, FSDPModule)
