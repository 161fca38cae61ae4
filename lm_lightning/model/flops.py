"""Training FLOPs of a causal LM (the one formula), and Lightning's ThroughputMonitor wired to it.

MFU = achieved model FLOPs per second / the device's peak. The peak comes from Lightning's table of
devices (``get_available_flops``) where it knows the device, else from ``peak_flops`` in the config,
and the callback says which one it used; it is never a constant for one GPU (nanoGPT PR #464 reports
104% MFU on an H100 for that reason).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from lm_lightning.data.examples import real_tokens


def matmul_params(model: nn.Module) -> int:
    """Parameters that multiply activations: the weights of linear layers, the LM head included.

    Embedding lookups (token and position) cost no FLOPs and are left out; a head tied to the token
    embedding is a real matmul and is counted once, as the ``nn.Linear`` it is called through. GPT-2's
    ``Conv1D`` is a linear layer with transposed weights.
    """
    from transformers.pytorch_utils import Conv1D

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear | Conv1D))


def meta_model(config: PretrainedConfig) -> PreTrainedModel:
    """The model of ``config`` on the meta device: shapes without memory, built in milliseconds."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def training_flops_per_token(
    config: PretrainedConfig, seq_len: int, n_matmul_params: int | None = None
) -> int:
    """Model FLOPs to train on one token of a ``seq_len`` sequence: forward and backward.

    ``6 N + 12 L d T`` (PaLM, appendix B; nanoGPT's ``estimate_mfu``): 2 FLOPs per multiply-add, times 3
    for forward + backward, over the ``N`` matmul parameters, plus attention's ``Q K^T`` and ``A V``
    (``2 * 2 d T`` per token and layer forward, times 3). The causal mask's unused half is counted, as
    the usual MFU convention does; recomputation (activation checkpointing) is not, so MFU stays a
    property of the model and not of how it is run.
    """
    if n_matmul_params is None:
        n_matmul_params = matmul_params(meta_model(config))
    n_layer = config.num_hidden_layers
    d_model = config.hidden_size
    return 6 * n_matmul_params + 12 * n_layer * d_model * seq_len


def training_flops_per_batch(
    config: PretrainedConfig, batch_size: int, seq_len: int, n_matmul_params: int | None = None
) -> int:
    """Model FLOPs of one training step on a ``(batch_size, seq_len)`` batch."""
    return batch_size * seq_len * training_flops_per_token(config, seq_len, n_matmul_params)


class LMThroughputMonitor(ThroughputMonitor):
    """Logs ``train/tokens_per_sec`` (items: real tokens, padding excluded), ``samples_per_sec``, FLOPs/s and
    ``device/mfu`` (of the FLOPs computed, padding included).

    Lightning's ``ThroughputMonitor`` (timings after ``cuda.synchronize``), reading the module's
    ``flops_per_batch`` (``CausalLMModule`` computes it with :func:`training_flops_per_batch`).

    Args:
        peak_flops: Peak FLOPs/s of one device at the training precision, used when Lightning's table
            does not know the device (it has no entry for some current GPUs, and none for CPUs); the
            table's value wins where it has one.
        window_size: Batches in the rolling average (metrics appear once the window is full).
        separator: Between the stage and the metric name, e.g. ``train/device/mfu``.
    """

    def __init__(self, peak_flops: float | None = None, window_size: int = 50, separator: str = "/") -> None:
        super().__init__(
            batch_size_fn=_batch_size,
            length_fn=_num_tokens,
            window_size=window_size,
            separator=separator,
        )
        self.peak_flops = peak_flops
        self.peak_source: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        device = trainer.strategy.root_device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        if self.available_flops:
            self.peak_source = f"Lightning's table for {name!r}"
        elif self.peak_flops:
            self.available_flops = self.peak_flops
            for throughput in self._throughputs.values():
                throughput.available_flops = self.peak_flops
            self.peak_source = (
                f"peak_flops={self.peak_flops:.3g} from the config ({name!r} is not in the table)"
            )
        else:
            self.peak_source = None
        if self.peak_source:
            rank_zero_info(
                f"MFU peak: {self.available_flops:.3g} FLOPs/s per device, from {self.peak_source}."
            )
        else:
            rank_zero_info(
                f"MFU not logged: Lightning's table has no peak for {name!r}; set the callback's peak_flops "
                "(per device, at the training precision) to log it."
            )


def _batch_size(batch: Any) -> int:
    return batch["input_ids"].size(0)


def _num_tokens(batch: Any) -> int:
    return real_tokens(batch)
