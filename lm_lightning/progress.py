"""What a fit shows on the console: a progress bar with tokens per second, a line after each validation."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lm_lightning.data.examples import real_tokens


class TokensPerSecondProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with ``real tok/s``: input tokens per second over all processes (smoothed),
    padding not counted (``lm_lightning.data.examples.real_tokens``)."""

    def __init__(self, refresh_rate: int = 1, smoothing: float = 0.9) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.smoothing = smoothing
        self._last: float | None = None
        self._rate: float | None = None
        self._epoch_bar_ready = self._first_batch = False

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._last is not None and isinstance(batch, dict) and "input_ids" in batch:
            rate = real_tokens(batch) * trainer.world_size / max(now - self._last, 1e-9)
            self._rate = (
                rate if self._rate is None else self.smoothing * self._rate + (1 - self.smoothing) * rate
            )
        self._last = now
        if self._first_batch:  # resumed at batch_idx: the rate counts this run's batches only
            self._first_batch = self._epoch_bar_ready = False
            bar = self.train_progress_bar
            if not bar.disable:  # disabled (ranks but zero): a bare object
                bar.initial, bar.start_t = batch_idx, time.time()  # tqdm's own clock
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The epoch's bar from the start, with its epoch and total: Lightning's first shows 'Training: 0/?'
        # until the epoch starts, and a fit resumed mid-epoch never gets past it (that epoch has begun).
        bar = Tqdm(
            desc=f"Epoch {trainer.current_epoch}",
            total=convert_inf(self.total_train_batches),
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )  # Lightning's init_train_tqdm, with the epoch and total
        self.train_progress_bar, self._epoch_bar_ready, self._first_batch = bar, True, True

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None  # validation time between epochs is not training throughput
        if self._epoch_bar_ready:  # the bar on_train_start made is this epoch's
            self._epoch_bar_ready = False
            return
        super().on_train_epoch_start(trainer, pl_module)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        # The step's loss as a float, read back with the step's one sync (lm_lightning.model.step): a
        # prog_bar metric would be read from its tensor on every batch.
        outcome = getattr(getattr(pl_module, "step_loss", None), "outcome", None)
        if outcome is not None:
            metrics["train/loss"] = f"{outcome.loss:.3f}"
        if self._rate is not None:
            metrics["real tok/s"] = f"{self._rate:,.0f}"
        return metrics


class ValidationSummary(L.Callback):
    """One line after each validation of a fit, kept on screen (and in a log file without a progress bar).

    ``epoch 1: val/perplexity 163.0 (best 163.0) | 31 s | 4,100 real tok/s``: the epoch's time so far and its
    average training throughput (input tokens per second over all processes, padding and validation time
    excluded).
    """

    def __init__(self) -> None:
        self._epoch_start = time.perf_counter()
        self._batch_start: float | None = None
        self._train_time = 0.0
        self._tokens = 0
        self._best = math.inf

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start, self._train_time, self._tokens = time.perf_counter(), 0.0, 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._batch_start is not None and isinstance(batch, dict) and "input_ids" in batch:
            self._train_time += time.perf_counter() - self._batch_start
            self._tokens += real_tokens(batch) * trainer.world_size

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        perplexity = trainer.callback_metrics.get("val/perplexity")
        if trainer.sanity_checking or perplexity is None or trainer.state.fn != "fit":
            return
        self._best = min(self._best, float(perplexity))
        elapsed = time.perf_counter() - self._epoch_start
        rate = self._tokens / self._train_time if self._train_time else 0.0
        message = (
            f"epoch {trainer.current_epoch}: val/perplexity {float(perplexity):.1f} (best {self._best:.1f}) "
            f"| {elapsed:.0f} s | {rate:,.0f} real tok/s"
        )
        bar = next((c for c in trainer.callbacks if isinstance(c, TQDMProgressBar) and c.is_enabled), None)
        if bar is not None and trainer.is_global_zero:
            bar.print(message)  # above the bars, not through them
        else:
            rank_zero_info(message)
