"""Up-front checks of a run's settings: each fails before any compute, naming the setting, value and remedy.

The data module and the module check their own arguments when they are built; what is checked here needs
more than one object (the trainer's accelerator and precision, a checkpoint against the configured model).
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

from lm_lightning.checkpointing import find_last_checkpoint, read_checkpoint_hparams

DEBUG_ENV = "LM_LIGHTNING_DEBUG"
# Hyper-parameters that every CausalLMModule checkpoint holds.
_MODULE_KEYS = {"model_name_or_path", "model_config", "loss_chunk_size"}
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
            "(the accelerator here). On CPU use 32-true (default), bf16-mixed or 64-true; set "
            "--trainer.precision accordingly."
        )
    no_bf16 = torch.cuda.is_available() and not torch.cuda.is_bf16_supported()
    if on_cuda and flag.startswith("bf16") and no_bf16:
        raise RunError(
            f"trainer.precision={flag!r}: this GPU ({torch.cuda.get_device_name()}) has no bfloat16 support. "
            "Use 16-mixed or 32-true: set --trainer.precision accordingly."
        )


def run_root(logger_config: Any) -> Path | None:
    """``save_dir/name`` of a TensorBoard- or CSV-style logger config (a Namespace or dict), else ``None``."""
    init_args = _get(logger_config, "init_args")
    save_dir, name = _get(init_args, "save_dir"), _get(init_args, "name")
    if save_dir is None:
        return None
    return Path(save_dir) / (name or "")


def resolve_last(ckpt_dirs: list[Path], subcommand: str, setting: str = "--ckpt_path last") -> Path | None:
    """The newest ``last*.ckpt`` in ``ckpt_dirs`` (each a run root or a checkpoint folder).

    ``fit`` with nothing to resume starts from scratch (so ``--ckpt_path last`` can always be given);
    ``validate``/``test``/``predict`` would silently evaluate untrained weights, so they fail instead.
    """
    found = [p for d in ckpt_dirs if (p := find_last_checkpoint(d)) is not None]
    if found:
        return max(found, key=lambda p: p.stat().st_mtime)
    if subcommand != "fit":
        raise RunError(
            f"{setting}: no last*.ckpt under {', '.join(map(str, ckpt_dirs)) or 'any run folder'}. "
            "Run fit first, or give the path of a checkpoint."
        )
    return None


def resolve_best(last: Path | None, monitor: str | None) -> Path:
    """The best checkpoint recorded in the newest ``last.ckpt`` by the ``ModelCheckpoint`` on ``monitor``."""
    if last is None:
        raise RunError("--ckpt_path best: no run with a last.ckpt was found to read the best one from.")
    checkpoint = torch.load(last, map_location="cpu", mmap=True, weights_only=False)
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if key.startswith("ModelCheckpoint") and f"'monitor': {monitor!r}" in key:
            best = state.get("best_model_path")
            if best and os.path.isfile(best):
                return Path(best)
    raise RunError(f"--ckpt_path best: {str(last)!r} records no existing best checkpoint on {monitor!r}.")


def check_checkpoint(path: str | os.PathLike) -> None:
    """Fail when ``path`` is missing, or is not a Lightning checkpoint of a ``CausalLMModule``.

    The model's settings then come from the checkpoint (LightningCLI applies its hyper-parameters over the
    config), so its weights always fit the model that is built.
    """
    hparams = read_checkpoint_hparams(path)
    if not set(hparams) >= _MODULE_KEYS:
        raise RunError(
            f"--ckpt_path={str(path)!r} is a Lightning checkpoint but not of a CausalLMModule (its "
            f"hyper-parameters are {sorted(hparams) or 'empty'}). Give a checkpoint written by "
            "lm_lightning fit."
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


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)
