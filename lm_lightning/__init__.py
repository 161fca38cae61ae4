"""lm_lightning: train and fine-tune causal language models with PyTorch Lightning.

The names below are imported on first use (PEP 562), so ``import lm_lightning`` costs little more than
``import lightning``: ``peft``, ``datasets`` and the generation code load only where they are used.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

_WHERE = {
    "cli_main": "lm_lightning.cli",
    "CurvesCallback": "lm_lightning.curves",
    "draw_curves": "lm_lightning.curves",
    "builtin_corpus": "lm_lightning.data.corpus",
    "CausalLMDataModule": "lm_lightning.data.datamodule",
    "BlockPacker": "lm_lightning.data.packing",
    "StreamingBlocks": "lm_lightning.data.streaming",
    "load_tokenizer": "lm_lightning.data.tokenizer",
    "train_bpe_tokenizer": "lm_lightning.data.tokenizer",
    "HarnessEvalCallback": "lm_lightning.evaluation.callback",
    "evaluate_checkpoint": "lm_lightning.evaluation.command",
    "TextGenerationCallback": "lm_lightning.generation.callback",
    "PRESETS": "lm_lightning.generation.decoding",
    "DecodingConfig": "lm_lightning.generation.decoding",
    "GeneratedText": "lm_lightning.generation.decoding",
    "generate_texts": "lm_lightning.generation.decoding",
    "resolve_decoding": "lm_lightning.generation.decoding",
    "JSONLPredictionWriter": "lm_lightning.generation.writer",
    "LMThroughputMonitor": "lm_lightning.model.flops",
    "training_flops_per_batch": "lm_lightning.model.flops",
    "LoraSettings": "lm_lightning.model.lora",
    "TokenNLL": "lm_lightning.model.loss",
    "causal_lm_loss": "lm_lightning.model.loss",
    "causal_lm_nll": "lm_lightning.model.loss",
    "CausalLMModule": "lm_lightning.model.module",
    "export_checkpoint": "lm_lightning.model.module",
    "transformer_block_policy": "lm_lightning.model.parallel",
    "FSDP2Strategy": "lm_lightning.model.sharded",
    "TokensPerSecondProgressBar": "lm_lightning.progress",
    "ValidationSummary": "lm_lightning.progress",
}
"""Where each public name lives."""

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from lm_lightning.cli import cli_main
    from lm_lightning.curves import CurvesCallback, draw_curves
    from lm_lightning.data.corpus import builtin_corpus
    from lm_lightning.data.datamodule import CausalLMDataModule
    from lm_lightning.data.packing import BlockPacker
    from lm_lightning.data.streaming import StreamingBlocks
    from lm_lightning.data.tokenizer import load_tokenizer, train_bpe_tokenizer
    from lm_lightning.evaluation.callback import HarnessEvalCallback
    from lm_lightning.evaluation.command import evaluate_checkpoint
    from lm_lightning.generation.callback import TextGenerationCallback
    from lm_lightning.generation.decoding import (
        PRESETS,
        DecodingConfig,
        GeneratedText,
        generate_texts,
        resolve_decoding,
    )
    from lm_lightning.generation.writer import JSONLPredictionWriter
    from lm_lightning.model.flops import LMThroughputMonitor, training_flops_per_batch
    from lm_lightning.model.lora import LoraSettings
    from lm_lightning.model.loss import TokenNLL, causal_lm_loss, causal_lm_nll
    from lm_lightning.model.module import CausalLMModule, export_checkpoint
    from lm_lightning.model.parallel import transformer_block_policy
    from lm_lightning.model.sharded import FSDP2Strategy
    from lm_lightning.progress import TokensPerSecondProgressBar, ValidationSummary


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (PEP 562), then keep it here."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'lm_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


try:
    __version__ = version("lm_lightning")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "PRESETS",
    "BlockPacker",
    "CausalLMDataModule",
    "CausalLMModule",
    "CurvesCallback",
    "DecodingConfig",
    "FSDP2Strategy",
    "GeneratedText",
    "HarnessEvalCallback",
    "JSONLPredictionWriter",
    "LMThroughputMonitor",
    "LoraSettings",
    "StreamingBlocks",
    "TextGenerationCallback",
    "TokenNLL",
    "TokensPerSecondProgressBar",
    "ValidationSummary",
    "builtin_corpus",
    "causal_lm_loss",
    "causal_lm_nll",
    "cli_main",
    "draw_curves",
    "evaluate_checkpoint",
    "export_checkpoint",
    "generate_texts",
    "load_tokenizer",
    "resolve_decoding",
    "train_bpe_tokenizer",
    "training_flops_per_batch",
    "transformer_block_policy",
]
