"""A progress bar that also shows training throughput in tokens per second."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class TokensPerSecondProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with ``tok/s``: input tokens per second over all processes (smoothed)."""

    def __init__(self, refresh_rate: int = 1, smoothing: float = 0.9) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.smoothing = smoothing
        self._last: float | None = None
        self._rate: float | None = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._last is not None and isinstance(batch, dict) and "input_ids" in batch:
            rate = batch["input_ids"].numel() * trainer.world_size / max(now - self._last, 1e-9)
            self._rate = (
                rate if self._rate is None else self.smoothing * self._rate + (1 - self.smoothing) * rate
            )
        self._last = now
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None  # validation time between epochs is not training throughput
        super().on_train_epoch_start(trainer, pl_module)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        if self._rate is not None:
            metrics["tok/s"] = f"{self._rate:,.0f}"
        return metrics
