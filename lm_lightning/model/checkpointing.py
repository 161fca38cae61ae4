"""Checkpoints that survive a crash: atomic writes, RNG state, and finding the checkpoint to resume from.

Exact resume needs four things in the checkpoint besides the weights: the optimizer and scheduler (Lightning
saves them), the position in the epoch's data order (the train loader is a torchdata ``StatefulDataLoader``,
whose state Lightning saves), and the random state that dropout draws from (saved here, by the module).
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem

from lm_lightning.errors import RunError
from lm_lightning.io import atomic_path
from lm_lightning.model.sharded import META_FILE, is_sharded_checkpoint

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
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


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


def gather_rng_states(world_size: int, states: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every process's ``states`` (default: :func:`collect_rng_states` now), indexed by global rank (a
    collective: all ranks call it).

    Under DDP rank 0 alone writes the checkpoint, and each rank's dropout draws from its own state.
    """
    states = collect_rng_states() if states is None else states
    if world_size < 2 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [states]
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, states)
    return gathered


def rank_rng_states(saved: Any, rank: int) -> dict[str, Any] | None:
    """This rank's states from a checkpoint: the per-rank list, or an older checkpoint's single state."""
    if isinstance(saved, dict):
        return saved
    if isinstance(saved, list | tuple) and rank < len(saved):
        return saved[rank]
    return None  # a rank the saving run did not have: it keeps the seeded state


def restore_loader_position(trainer: Any) -> None:
    """Give the train loader the position saved in the checkpoint, if Lightning has not yet.

    Lightning 2.6 hands a resumed fit's loader its saved state only when it creates the loader after reading
    the checkpoint. With ``max_epochs`` set (the FSDP recipe), ``estimated_stepping_batches`` in
    ``configure_optimizers`` creates it first, and the resumed fit would start its epoch over.
    """
    fit_loop = trainer.fit_loop
    pending = fit_loop._combined_loader_states_to_load
    if fit_loop.restarting and fit_loop._combined_loader is not None and pending:
        fit_loop._combined_loader = None  # set it up again, as Lightning would have: with the saved state
        fit_loop.setup_data()


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
    """The newest ``last*.ckpt`` (a file, or a sharded folder) under ``run_root/*/checkpoints/`` (the logger's
    versions) or in ``run_root``.

    Lightning resolves ``ckpt_path="last"`` in the *new* run's version folder only, which a fresh process has
    just numbered one higher, so it finds nothing and silently starts from scratch.
    """
    root = Path(run_root)
    patterns = ("*/checkpoints/last*.ckpt", "checkpoints/last*.ckpt", "last*.ckpt")
    candidates = [p for pattern in patterns for p in root.glob(pattern) if is_checkpoint(p)]
    if not candidates:
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime)


def is_checkpoint(path: str | os.PathLike) -> bool:
    """A checkpoint file, or a sharded checkpoint folder (FSDP2: shards and ``meta.pt``)."""
    return os.path.isfile(path) or is_sharded_checkpoint(path)


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


def load_checkpoint(path: str | os.PathLike, setting: str = "--ckpt_path") -> dict[str, Any]:
    """A Lightning checkpoint file, loaded as tensors and plain data only; a clear error when it is not one.

    ``weights_only=True``: a checkpoint from elsewhere never runs code. Unpickling an arbitrary object can
    execute anything (``__reduce__``), so a file holding anything but tensors, numbers, strings and
    containers of them is refused, not loaded. The tensors are memory-mapped, not read, so this is cheap for
    a large checkpoint.
    """
    path = str(path)
    folder = is_sharded_checkpoint(path)
    if folder:  # a folder of shards: its meta.pt holds all but the weights and optimizer state
        path = os.path.join(path, META_FILE)
    if "://" not in path and not os.path.isfile(path):
        hint = " (it is a folder)" if os.path.isdir(path) else ""
        raise FileNotFoundError(
            f"{setting}={path!r}: no such checkpoint file{hint}. Give the path of a .ckpt file written by "
            "fit, or 'last' / 'best'."
        )
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # not the zip format that mmap needs: read it whole, or say why not
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            raise RunError(
                f"{setting}={path!r} holds objects that are not tensors or plain data, so it is not loaded "
                "(unpickling it could run code stored in it). Use a checkpoint written by lm_lightning fit, "
                "or share weights as a Hugging Face folder (safetensors): python -m lm_lightning export."
            ) from err
        raise _not_a_checkpoint(setting, path, err) from err
    except Exception as err:  # a text file, a truncated file, a safetensors file ...
        raise _not_a_checkpoint(setting, path, err) from err
    if not isinstance(checkpoint, dict) or ("state_dict" not in checkpoint and not folder):
        raise RunError(
            f"{setting}={path!r} is not a PyTorch Lightning checkpoint (no 'state_dict' in it). Give a .ckpt "
            "file written by fit."
        )
    return checkpoint


def _not_a_checkpoint(setting: str, path: str, err: Exception) -> RunError:
    first_line = str(err).splitlines()[0] if str(err) else ""
    return RunError(
        f"{setting}={path!r} is not a PyTorch Lightning checkpoint ({type(err).__name__}: {first_line}). "
        "Give a .ckpt file written by fit."
    )


def read_checkpoint_hparams(path: str | os.PathLike, setting: str = "--ckpt_path") -> dict[str, Any]:
    """The hyper-parameters stored in a Lightning checkpoint (see :func:`load_checkpoint`)."""
    return dict(load_checkpoint(path, setting).get("hyper_parameters") or {})


# Hyper-parameters that every CausalLMModule checkpoint holds.
_MODULE_KEYS = {"model_name_or_path", "model_config", "loss_chunk_size"}


def resolve_last(ckpt_dirs: list[Path], subcommand: str, setting: str = "--ckpt_path last") -> Path | None:
    """The newest ``last*.ckpt`` in ``ckpt_dirs`` (each a run root or a checkpoint folder).

    ``fit`` with nothing to resume starts from scratch (so ``--ckpt_path last`` can always be given);
    ``validate``/``test``/``predict`` would silently evaluate untrained weights, so they fail instead.
    """
    found = [p for d in ckpt_dirs if (p := find_last_checkpoint(d)) is not None]
    if found:
        return max(found, key=lambda p: p.stat().st_mtime)
    if subcommand != "fit":
        where = ", ".join(map(str, ckpt_dirs)) or "any run folder"
        # best is read from the newest last.ckpt (its checkpoint callback's record): say what is missing.
        what = "no run with checkpoints" if setting.endswith("best") else "no last*.ckpt"
        raise RunError(f"{setting}: {what} under {where}. Run fit first, or give the path of a checkpoint.")
    return None


def resolve_best(last: Path | None, monitor: str | None) -> Path:
    """The best checkpoint recorded in the newest ``last.ckpt`` by the ``ModelCheckpoint`` on ``monitor``."""
    if last is None:
        raise RunError("--ckpt_path best: no run with a last.ckpt was found to read the best one from.")
    checkpoint = load_checkpoint(last, "--ckpt_path best")
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if key.startswith("ModelCheckpoint") and f"'monitor': {monitor!r}" in key:
            best = state.get("best_model_path")
            if best and is_checkpoint(best):
                return Path(best)
    raise RunError(f"--ckpt_path best: {str(last)!r} records no existing best checkpoint on {monitor!r}.")


def check_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint at ``path``; fails when it is missing or not a Lightning checkpoint of ours.

    The model's settings then come from the checkpoint (LightningCLI applies its hyper-parameters over the
    config), so its weights always fit the model that is built.
    """
    checkpoint = load_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters") or {}
    if not set(hparams) >= _MODULE_KEYS:
        raise RunError(
            f"--ckpt_path={str(path)!r} is a Lightning checkpoint but not of a CausalLMModule (its "
            f"hyper-parameters are {sorted(hparams) or 'empty'}). Give a checkpoint written by "
            "lm_lightning fit."
        )
    return checkpoint


def completed_epochs(checkpoint: dict[str, Any]) -> int:
    """Epochs that the fit which wrote ``checkpoint`` had finished."""
    loops = checkpoint.get("loops") or {}
    try:
        return int(loops["fit_loop"]["epoch_progress"]["current"]["completed"])
    except (KeyError, TypeError):
        return int(checkpoint.get("epoch", 0))
