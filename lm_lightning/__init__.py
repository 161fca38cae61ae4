"""lm_lightning: train and fine-tune causal language models with PyTorch Lightning."""

from importlib.metadata import PackageNotFoundError, version

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
