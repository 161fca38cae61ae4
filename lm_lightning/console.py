"""What a run prints besides its progress: a quiet start (one line on what runs where), the closing lines of a
fit (where every result went), and the library chatter that is left out unless ``--verbose true``.

Known library lines are filtered where they come from: each known Lightning info line by a filter on its
loggers' handlers, and each known warning by a ``warnings`` filter on its own message. Other lines and
warnings still show.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary

from lm_lightning.curves import CurvesCallback, describe_data, describe_model

VERBOSE_ENV = "LM_LIGHTNING_VERBOSE"

# Warnings of libraries that say nothing a user of lm_lightning can act on (message regexes).
KNOWN_WARNINGS = (
    # Lightning 2.6 calls torch's deprecated pytree API on every batch (torch 2.9).
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # peft sets fan_in_fan_out for GPT-2's Conv1D layers itself, and says so.
    r"fan_in_fan_out is set to False but the target module is `Conv1D`",
    # transformers' own attribute, read by peft when it prepares a model.
    r"`is_gradient_checkpointing` is deprecated",
    # Lightning's notice about loader workers: the data module's loaders read memory-mapped blocks.
    r"The '\w+_dataloader' does not have many workers",
)


def is_verbose(flag: bool | None = None) -> bool:
    """``--verbose true``, or ``LM_LIGHTNING_VERBOSE=1`` in the environment."""
    return bool(flag) or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


# Lightning's info lines that the run's own line (or the closing lines) already say; its other info lines,
# and ours sent through rank_zero_info (a resumed schedule, an interrupt's checkpoint), still show.
KNOWN_LINES = re.compile(
    r"(GPU|TPU|HPU) available: |💡 Tip: |Seed set to |LOCAL_RANK: |Loading `train_dataloader` to estimate "
    r"|`Trainer\.fit` stopped: |Restoring states from the checkpoint path |Restored all states from the "
    r"|Using (bfloat16|16bit) Automatic Mixed Precision|You are using a CUDA device "
)


class _KnownLines(logging.Filter):
    """Drops the records of ``KNOWN_LINES``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not KNOWN_LINES.match(record.getMessage())


def quiet_libraries(verbose: bool) -> None:
    """Leave out Lightning's known info lines (devices, litlogger's tip, seeds) and the known library
    warnings, unless ``verbose``; both come back with it."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        for handler in logging.getLogger(name).handlers:
            for old in [f for f in handler.filters if isinstance(f, _KnownLines)]:
                handler.removeFilter(old)
            if not verbose:
                handler.addFilter(_KnownLines())
    if not verbose:
        for message in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=message)


def format_params(count: int) -> str:
    """``3.49 M`` (three significant digits)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return str(count)


def run_line(trainer: L.Trainer, pl_module: L.LightningModule, split: str, reason: str | None = None) -> str:
    """``gpt2 from scratch · 3.49 M params | python-docs: 8,802 blocks of 128 | 32-true on cpu (2 threads)``:
    the model, the data of ``split``, the precision and the device (and ``reason``: why that precision)."""
    model = describe_model(pl_module)
    if not getattr(pl_module, "hparams", {}).get("model_name_or_path"):
        model = model.replace(" · ", " from scratch · ", 1)
    data = trainer.datamodule
    parts = [model]
    rows = getattr(data, "datasets", {}).get(split) if data is not None else None
    if rows is not None:
        text = getattr(data, "data_format", "text") in (None, "text")
        unit = f"blocks of {data.block_size}" if text else f"{split} examples"
        parts.append(f"{describe_data(data)}: {len(rows):,} {unit}")
    elif data is not None:
        parts.append(describe_data(data))
    device = trainer.strategy.root_device
    details = [f"{torch.get_num_threads()} threads"] if device.type == "cpu" else []
    if device.type == "cuda":
        details = [torch.cuda.get_device_name(device)]
    details += [reason] if reason else []
    where = f"{trainer.world_size} x {device.type}" if trainer.world_size > 1 else device.type
    parts.append(f"{trainer.precision} on {where}" + (f" ({'; '.join(details)})" if details else ""))
    return " | ".join(parts)


class RunBanner(L.Callback):
    """One line at the start of each fit, validate, test or predict: model, data, precision and device.

    ``reason``: why the run has its precision (``lm_lightning.precision.precision_reason``), set by the CLI.
    """

    def __init__(self) -> None:
        self.reason: str | None = None

    def _show(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        if trainer.is_global_zero:
            print(run_line(trainer, pl_module, split, self.reason), flush=True)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._show(trainer, pl_module, "train")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._show(trainer, pl_module, "validation")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._show(trainer, pl_module, "test")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._show(trainer, pl_module, "predict")


class ModelOnlySummary(ModelSummary):
    """Lightning's model summary (``--verbose true``) without the metric modules (``val_nll``, ``test_nll``)
    and the FLOPs column, which Lightning leaves at 0 without a measured forward pass."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], *args: Any, **kwargs: Any) -> None:
        columns = dict(summary_data)
        keep = [i for i, kind in enumerate(columns.get("Type", [])) if kind != "TokenNLL"]
        data = [(name, [values[i] for i in keep]) for name, values in summary_data if name != "FLOPs"]
        kwargs.pop("total_flops", None)
        ModelSummary.summarize(data, *args, total_flops=0, **kwargs)


def closing_lines(trainer: L.Trainer, pl_module: L.LightningModule) -> list[str]:
    """Where a finished fit's results are, a line each: best and last checkpoints, export, curves."""
    step, epochs = trainer.global_step, trainer.current_epoch
    if 0 < trainer.max_steps <= step:
        lines = [f"fit done: max_steps={trainer.max_steps} reached ({epochs} epoch{'s' * (epochs != 1)})."]
    elif trainer.max_epochs is not None and 0 <= trainer.max_epochs <= epochs:
        lines = [f"fit done: max_epochs={trainer.max_epochs} reached ({step} optimizer steps)."]
    else:
        lines = [f"fit done at step {step}, epoch {epochs}."]
    ranked = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor]
    best = next((c for c in ranked if c.best_model_path), None)
    if best is not None:
        score = f" ({best.monitor} {float(best.best_model_score):.2f})" if best.best_model_score else ""
        lines.append(f"best checkpoint: {_short(best.best_model_path)}{score}")
    last = [c.last_model_path for c in trainer.checkpoint_callbacks if getattr(c, "last_model_path", "")]
    curves = next((c for c in trainer.callbacks if isinstance(c, CurvesCallback)), None)
    validated = curves.curves.val_perplexity if curves is not None else []
    if last:
        score = ""
        if validated:
            at, value = validated[-1]
            score = f", val/perplexity {value:.2f}" + (f" at step {at}" if at != step else "")
        lines.append(f"last checkpoint: {_short(max(last, key=_mtime))} (step {step}{score})")
    export = getattr(pl_module, "exported", None)
    if export is not None:
        lines.append(f"exported model:  {_short(export)}")
    if curves is not None and curves.written is not None:
        lines.append(f"curves:          {_short(curves.written)} (run_summary.json beside it)")
    return lines


def _mtime(path: str) -> float:
    return Path(path).stat().st_mtime if Path(path).exists() else 0.0


def _short(path: str | os.PathLike) -> str:
    """``path`` relative to the working folder when it is under it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
