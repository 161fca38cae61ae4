"""A progress bar that also shows training throughput, and one summary line after each validation."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class TokensPerSecondProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with ``tok/s`` (input tokens per second over all processes, smoothed).

    After each validation it prints one line that stays on screen, e.g.
    ``epoch 1: val/perplexity 163.0 (best 163.0) | 31 s | 4,100 tok/s``: the epoch's time so far and its
    average training throughput.
    """

    def __init__(self, refresh_rate: int = 1, smoothing: float = 0.9) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.smoothing = smoothing
        self._last: float | None = None
        self._rate: float | None = None
        self._epoch_start = time.perf_counter()
        self._train_time = 0.0
        self._epoch_tokens = 0
        self._best = math.inf

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._last is not None and isinstance(batch, dict) and "input_ids" in batch:
            tokens = batch["input_ids"].numel() * trainer.world_size
            rate = tokens / max(now - self._last, 1e-9)
            self._rate = (
                rate if self._rate is None else self.smoothing * self._rate + (1 - self.smoothing) * rate
            )
            self._epoch_tokens += tokens
            self._train_time += now - self._last
        self._last = now
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None  # validation time between epochs is not training throughput
        self._epoch_start, self._train_time, self._epoch_tokens = time.perf_counter(), 0.0, 0
        super().on_train_epoch_start(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None  # the next training batch's time does not include validation
        super().on_validation_start(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        perplexity = trainer.callback_metrics.get("val/perplexity")
        if trainer.sanity_checking or perplexity is None or trainer.state.fn != "fit":
            return
        self._best = min(self._best, float(perplexity))
        elapsed = time.perf_counter() - self._epoch_start
        rate = self._epoch_tokens / self._train_time if self._train_time else 0.0
        self.print(
            f"epoch {trainer.current_epoch}: val/perplexity {float(perplexity):.1f} (best {self._best:.1f}) "
            f"| {elapsed:.0f} s | {rate:,.0f} tok/s"
        )

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        if self._rate is not None:
            metrics["tok/s"] = f"{self._rate:,.0f}"
        return metrics
