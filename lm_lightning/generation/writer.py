"""Writes ``predict`` outputs as JSON lines, complete or not at all."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter


class JSONLPredictionWriter(BasePredictionWriter):
    """One JSON line per generated text (prompt, preset, index, text, num_new_tokens).

    Lines go to a temporary file renamed into place when prediction ends, so a failed run leaves no
    partial output. With several processes, each writes ``<name>.rank<N>.jsonl``.

    Args:
        output_path: The JSONL file; default ``predictions.jsonl`` in the run's log directory.
    """

    def __init__(self, output_path: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_path = output_path
        self._file = None
        self._path: Path | None = None
        self.written: Path | None = None  # the file, once complete

    def _target(self, trainer: L.Trainer) -> Path:
        path = Path(self.output_path) if self.output_path else Path(trainer.log_dir) / "predictions.jsonl"
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        return path

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._path = self._target(trainer)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._path.with_name(f".{self._path.name}.tmp"), "w", encoding="utf-8")  # noqa: SIM115

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: list[dict[str, Any]],
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        for record in prediction:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tmp = Path(self._file.name)
        self._file.close()
        os.replace(tmp, self._path)
        self.written = self._path

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
            Path(self._file.name).unlink(missing_ok=True)
