"""User errors: up-front checks that need more than one object, and how the CLI reports any error.

Each check fails before any compute, naming the setting, the value and the remedy. The data module and the
module check their own arguments when they are built.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

DEBUG_ENV = "LM_LIGHTNING_DEBUG"
_PACKAGE = str(Path(__file__).parent)


class RunError(ValueError):
    """A run that cannot start (or go on) as configured; the CLI prints the message alone and exits."""


def check_precision(precision: Any, accelerator: Any) -> None:
    """Refuse a precision that the accelerator cannot run (Lightning would change it or fail mid-run).

    ``accelerator`` is the trainer's resolved accelerator object or its name.
    """
    name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__.lower()
    flag = str(precision)
    on_cpu = "cpu" in name
    on_cuda = "cuda" in name or name == "gpu"
    if on_cpu and flag in ("16-mixed", "16"):
        # Lightning turns this into bf16-mixed with a warning (fp16 autocast does not exist on CPU).
        raise RunError(
            f"trainer.precision={flag!r} needs a CUDA GPU: float16 mixed precision is not supported on CPU "
            "(the accelerator here). On CPU use 32-true, bf16-mixed (the default where the CPU has native "
            "bf16) or 64-true; set --trainer.precision accordingly."
        )
    no_bf16 = torch.cuda.is_available() and not torch.cuda.is_bf16_supported()
    if on_cuda and flag.startswith("bf16") and no_bf16:
        raise RunError(
            f"trainer.precision={flag!r}: this GPU ({torch.cuda.get_device_name()}) has no bfloat16 support. "
            "Use 16-mixed or 32-true: set --trainer.precision accordingly."
        )


def is_open_ended(
    max_epochs: int | None, max_steps: int | None, max_time: Any = None, streaming: bool = False
) -> bool:
    """Whether the trainer limits leave the number of optimizer steps unknown.

    No ``max_steps``, and ``max_epochs=-1``, or ``max_time`` without ``max_epochs`` (Lightning then sets it to
    -1; with neither it uses 1000 epochs), or a streamed train split (no length).
    """
    if max_steps not in (-1, None):
        return False
    return streaming or max_epochs == -1 or (max_epochs is None and max_time is not None)


def check_schedule_length(lr_scheduler: str, warmup_ratio: float, open_ended: bool) -> None:
    """Refuse a schedule that needs the number of training steps when the run has none.

    ``linear`` and ``cosine`` decay to the last step, and ``warmup_ratio`` is a share of all steps; the
    ``constant`` schedule (with ``warmup_steps``) does not need the length.
    """
    if not open_ended:
        return
    if lr_scheduler != "constant":
        setting = f"--model.lr_scheduler={lr_scheduler!r}"
    elif warmup_ratio:
        setting = f"--model.warmup_ratio={warmup_ratio}"
    else:
        return
    raise RunError(
        f"{setting} needs the number of training steps, but this run has no step limit (max_epochs=-1, "
        "max_time without max_steps, or a streaming dataset without max_steps): set --trainer.max_steps, "
        "or use --model.lr_scheduler constant (with --model.warmup_steps for a warm-up)."
    )


def check_compatible(
    config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase | None, block_size: int | None
) -> None:
    """Raise when the data cannot go through the model: blocks too long, or token ids out of range."""
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if block_size is not None and max_positions is not None and block_size > max_positions:
        raise RunError(
            f"block_size={block_size} is larger than the model's context of {max_positions} positions: set "
            f"block_size (--data.block_size) to at most {max_positions} (or raise n_positions when training "
            "from scratch)."
        )
    vocab_size = getattr(config, "vocab_size", None)
    if tokenizer is not None and vocab_size is not None and len(tokenizer) > vocab_size:
        raise RunError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's embedding has {vocab_size} rows: "
            "token ids would be out of range. Use the model's own tokenizer, or train from scratch with "
            "vocab_size >= the tokenizer's size."
        )


def check_trained(subcommand: str, ckpt_path: str | None, model_name_or_path: str | None) -> None:
    """Refuse to evaluate or sample a from-scratch model without a checkpoint: its weights are random."""
    if ckpt_path is None and not model_name_or_path:
        raise RunError(
            f"{subcommand} without --ckpt_path would run the model of this config with random weights (it "
            "trains from scratch). Give --ckpt_path last (the newest checkpoint of this config's runs), "
            "--ckpt_path best, or a checkpoint file; or --model.model_name_or_path for pretrained weights."
        )


def is_user_error(err: BaseException) -> bool:
    """A settings error (printed as one paragraph) rather than a bug: raised by lm_lightning's own checks,
    or by jsonargparse when one of our classes refused a value while it instantiated them."""
    if isinstance(err, RunError):
        return True
    if not isinstance(err, ValueError | FileNotFoundError):
        return False
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return False
    return frames[-1].filename.startswith(_PACKAGE) or (
        f"{os.sep}jsonargparse{os.sep}" in frames[-1].filename and bool(_our_reasons(str(err)))
    )


def _our_reasons(message: str) -> list[str]:
    """The reasons our own classes gave, from jsonargparse's nested 'does not validate' message."""
    reasons = []
    for line in message.splitlines():
        reason = line.strip().removeprefix("- ")
        ours = any(words in reason for words in (" is invalid", " must be ", " is unknown", " is not a "))
        if ours and reason not in reasons:
            reasons.append(reason)
    return reasons


def report_and_exit(err: BaseException, code: int) -> None:
    """Print ``err`` as one paragraph (its traceback with ``LM_LIGHTNING_DEBUG=1``) and exit with ``code``."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        traceback.print_exception(err)
    frames = traceback.extract_tb(err.__traceback__)
    message = str(err)
    if frames and f"{os.sep}jsonargparse{os.sep}" in frames[-1].filename:
        message = " ".join(_our_reasons(message)) or message
    print(f"error: {message}", file=sys.stderr)
    if os.environ.get(DEBUG_ENV, "") in ("", "0"):
        print(f"(set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
    raise SystemExit(code)
