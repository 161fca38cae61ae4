"""Interrupted fits lose nothing: on SIGTERM, SIGINT or SIGUSR1, finish the step, checkpoint, exit 128+N."""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class CheckpointOnInterrupt(L.Callback):
    """Stops a fit at the first optimizer-step boundary after a signal, with ``last.ckpt`` written there.

    Lightning's own SIGTERM handling stops after the current batch (mid gradient accumulation too) and exits
    with code 0, so a scheduler sees success and the steps since the last periodic checkpoint are lost. Here
    SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 set a flag; once the optimizer step in progress is done, every
    process checkpoints (the flag is reduced across processes, so all stop at the same step) and the fit
    exits with ``128 + signal`` (143 for SIGTERM, 130 for SIGINT). A second signal stops at once
    (``KeyboardInterrupt``); checkpoints are written atomically, so the last one stays whole. Under SLURM
    with auto-requeue, SIGUSR1 is left to Lightning's ``SLURMEnvironment``, which checkpoints and requeues.
    A resumed fit goes on from that step with the same result as an uninterrupted one.

    With ``CausalLMModule`` the flag travels in the optimizer step's one collective
    (``lm_lightning.model.step``), so the check adds no sync; with another module it is reduced here.

    A fit that ends after its last checkpoint (``max_steps`` or ``max_time`` between two periodic ones) gets
    ``last.ckpt`` at the step reached too: ``ModelCheckpoint`` writes it at the end of a fit only when it has
    written none during the fit, so ``--ckpt_path last`` would go on from an earlier step.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._last_step = -1
        self._saved_step: int | None = None  # the step of the newest checkpoint written in this fit

    @staticmethod
    def _signals() -> list[int]:
        signals = [signal.SIGTERM, signal.SIGINT]
        # Lightning installs a SIGUSR1 handler only for SLURM's auto-requeue (checkpoint, requeue): keep it.
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN, None):
            signals.append(signal.SIGUSR1)
        return signals

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received, self._last_step, self._saved_step = None, trainer.global_step, trainer.global_step
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for signum in self._signals():
            self._previous[signum] = signal.signal(signum, self._handle)
        if trainer.world_size > 1:
            # Lightning 2.6 broadcasts its own SIGTERM flag from rank 0 and reads it back (.item()) on every
            # micro-batch under DDP: a host sync per micro-batch. SIGTERM is handled here now, so that flag
            # never rises; the step's own collective carries ours. (An internal method of the epoch loop.)
            trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = _no_broadcast

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            raise KeyboardInterrupt  # a second signal: stop now
        self.received = signum
        rank_zero_info(
            f"\nReceived {signal.Signals(signum).name}: stopping after this optimizer step, with a "
            "checkpoint (send it again to stop at once)."
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._last_step:
            return  # accumulating gradients: no optimizer step yet
        self._last_step = trainer.global_step
        outcome = getattr(getattr(pl_module, "step_loss", None), "outcome", None)
        if outcome is not None and outcome.step == trainer.global_step:
            received = outcome.signal  # gathered with the step's loss: every process has the same value
        else:
            received = self.received or 0
            if trainer.world_size > 1:
                flag = torch.tensor(received, device=pl_module.device)
                received = int(trainer.strategy.reduce(flag, reduce_op="max").item())
        if not received:
            return
        path = _last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        rank_zero_info(
            f"Saved {path} at step {trainer.global_step} (epoch {trainer.current_epoch}). Resume with "
            "--ckpt_path last."
        )
        raise SystemExit(128 + received)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._saved_step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """``last.ckpt`` at the step reached, if no checkpoint was written there (see the class doc)."""
        callbacks = trainer.checkpoint_callbacks
        keeps_last = [c for c in callbacks if isinstance(c, ModelCheckpoint) and c.save_last and c.dirpath]
        if keeps_last and self._saved_step != trainer.global_step:
            trainer.save_checkpoint(_last_checkpoint_path(trainer))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        vars(trainer.fit_loop.epoch_loop).pop("_broadcast_sigterm_tensor", None)  # Lightning's own again


def pending_signal(trainer: L.Trainer) -> int:
    """The signal this process's ``CheckpointOnInterrupt`` received and has not acted on yet (0: none)."""
    return max(
        (c.received or 0 for c in trainer.callbacks if isinstance(c, CheckpointOnInterrupt)), default=0
    )


def _no_broadcast() -> None:
    return None


def _last_checkpoint_path(trainer: L.Trainer) -> str:
    """Where the trainer's ``ModelCheckpoint`` writes ``last.ckpt`` (else the root folder's checkpoints/)."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath:
            path = os.path.join(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
            callback.last_model_path = path
            return path
    return os.path.join(trainer.default_root_dir, "checkpoints", "last.ckpt")
