"""lm_lightning: train and fine-tune causal language models with PyTorch Lightning."""

from lm_lightning.callbacks import TextGenerationCallback
from lm_lightning.corpus import builtin_corpus, python_docs_texts
from lm_lightning.data import BlockPacker, CausalLMDataModule
from lm_lightning.flops import LMThroughputMonitor, training_flops_per_batch
from lm_lightning.generation import PRESETS, DecodingConfig, GeneratedText, generate_texts, resolve_decoding
from lm_lightning.loss import TokenNLL, causal_lm_nll
from lm_lightning.module import CausalLMModule, check_compatible, export_checkpoint
from lm_lightning.progress import TokensPerSecondProgressBar
from lm_lightning.streaming import StreamingBlocks
from lm_lightning.tokenizer import load_tokenizer, train_bpe_tokenizer

__all__ = [
    "PRESETS",
    "DecodingConfig",
    "GeneratedText",
    "TextGenerationCallback",
    "generate_texts",
    "resolve_decoding",
    "BlockPacker",
    "CausalLMDataModule",
    "CausalLMModule",
    "LMThroughputMonitor",
    "StreamingBlocks",
    "TokenNLL",
    "TokensPerSecondProgressBar",
    "builtin_corpus",
    "causal_lm_nll",
    "check_compatible",
    "export_checkpoint",
    "load_tokenizer",
    "python_docs_texts",
    "training_flops_per_batch",
    "train_bpe_tokenizer",
]
__version__ = "0.1.0"
