"""Checkpoints that survive a crash: atomic writes, RNG state, and finding the checkpoint to resume from.

Exact resume needs four things in the checkpoint besides the weights: the optimizer and scheduler (Lightning
saves them), the position in the epoch's data order (the train loader is a torchdata ``StatefulDataLoader``,
whose state Lightning saves), and the random state that dropout draws from (saved here, by the module).
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem

RNG_KEY = "lm_lightning_rng_states"


# ----------------------------------------------------------------------------- atomic writes
class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the target, ``fsync``, then ``os.replace`` over it.

    Lightning's own save writes to a temporary file in the system temp folder and then *moves* it; when that
    folder is on another filesystem (a tmpfs ``/tmp``, a node-local disk) the move is a copy into the final
    path, and a crash during the copy leaves a truncated ``last.ckpt``. A rename within one folder is atomic:
    the previous checkpoint stays whole until the new one is complete. Remote paths (``s3://`` ...) keep
    Lightning's behaviour.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path) or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` so that ``path`` holds either its old content or all of the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename itself is durable only once the folder's entry is on disk.
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


# ----------------------------------------------------------------------------- RNG state
def collect_rng_states() -> dict[str, Any]:
    """The states of every random generator that training draws from on this process.

    Tensors, lists and numbers only, so that Lightning's ``weights_only`` checkpoint loading accepts them.
    """
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), python_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`collect_rng_states` returned."""
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, python_gauss = states["python"]
    random.setstate((version, tuple(internal), python_gauss))
    if "cuda" in states and torch.cuda.is_available():
        cuda_states = states["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ----------------------------------------------------------------------------- finding checkpoints
def find_last_checkpoint(run_root: str | os.PathLike) -> Path | None:
    """The newest ``last*.ckpt`` under ``run_root/*/checkpoints/`` (the logger's versions) or in ``run_root``.

    Lightning resolves ``ckpt_path="last"`` in the *new* run's version folder only, which a fresh process has
    just numbered one higher, so it finds nothing and silently starts from scratch.
    """
    root = Path(run_root)
    patterns = ("*/checkpoints/last*.ckpt", "checkpoints/last*.ckpt", "last*.ckpt")
    candidates = [p for pattern in patterns for p in root.glob(pattern) if p.is_file()]
    if not candidates:
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime)


def newest_checkpoint(trainer: Any) -> str | None:
    """The most recently written checkpoint of the trainer's ``ModelCheckpoint`` callbacks, if any."""
    paths = set()
    for callback in getattr(trainer, "checkpoint_callbacks", []):
        for attr in ("last_model_path", "best_model_path"):
            path = getattr(callback, attr, "")
            if path and get_filesystem(path).exists(path):
                paths.add(path)
    if not paths:
        return None
    return max(paths, key=lambda p: os.path.getmtime(p) if "://" not in p else 0)


def read_checkpoint_hparams(path: str | os.PathLike, setting: str = "--ckpt_path") -> dict[str, Any]:
    """The hyper-parameters stored in a Lightning checkpoint; a clear error when ``path`` is not one.

    The tensors are memory-mapped, not read, so this is cheap for a large checkpoint.
    """
    path = str(path)
    if "://" not in path and not os.path.isfile(path):
        hint = " (it is a folder)" if os.path.isdir(path) else ""
        raise FileNotFoundError(
            f"{setting}={path!r}: no such checkpoint file{hint}. Give the path of a .ckpt file written by "
            "fit, or 'last' / 'best'."
        )
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        except RuntimeError:  # not the zip format that mmap needs: read it whole, or say why not
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a text file, a truncated file, a safetensors file ...
        raise ValueError(
            f"{setting}={path!r} is not a PyTorch Lightning checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Give a .ckpt file written by fit."
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(
            f"{setting}={path!r} is not a PyTorch Lightning checkpoint (no 'state_dict' in it). Give a .ckpt "
            "file written by fit."
        )
    return dict(checkpoint.get("hyper_parameters") or {})
