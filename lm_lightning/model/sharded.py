"""Sharded training (FSDP2) through Lightning's ``ModelParallelStrategy``, and its checkpoint folders.

``FSDP2Strategy`` is ``ModelParallelStrategy`` with every process in one data-parallel (sharding) dimension,
the FSDP2 options the module reads when it shards the model (``parallel.shard_model``), and checkpoint
folders written atomically. A sharded checkpoint is a folder: ``.metadata`` and one ``__<rank>_0.distcp``
shard file per process (``torch.distributed.checkpoint``), and ``meta.pt`` (everything but the weights and
optimizer state, written by rank 0).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from lm_lightning.errors import RunError
from lm_lightning.model.build import model_kwargs
from lm_lightning.model.export import save_hf_folder
from lm_lightning.model.parallel import gather_full_state_dict, shard_model

META_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a distributed checkpoint


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) over all processes, with atomic checkpoint folders.

    Args:
        mixed_precision: Compute in bf16 and reduce gradients in fp32 (FSDP2's ``MixedPrecisionPolicy``);
            ``None``: when ``trainer.precision`` is a bf16 one.
        cpu_offload: Keep parameter shards, gradients and optimizer state in host memory.
        save_distributed_checkpoint: Each process writes its shard (a checkpoint is a folder); ``False``
            gathers a single file on rank 0.
        process_group_backend: ``nccl`` on GPUs, ``gloo`` on CPUs by default.
        timeout_minutes: How long a collective waits for the other processes before failing.
    """

    def __init__(
        self,
        mixed_precision: bool | None = None,
        cpu_offload: bool = False,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout_minutes: float = 30.0,
    ) -> None:
        # tensor_parallel_size=1 and the data-parallel size from the device count: with "auto" for both,
        # Lightning 2.6 puts all devices of a node into the tensor-parallel dimension and shards nothing.
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timedelta(minutes=timeout_minutes),
        )
        self.mixed_precision = mixed_precision
        self.cpu_offload = cpu_offload

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Write the folder as ``.<name>.partial`` beside ``filepath``, then swap it in (rank 0).

        Lightning writes the shards and then ``meta.pt`` straight into the target folder (and bypasses any
        ``CheckpointIO``): a crash in between would leave a folder mixing two steps. Here the previous
        checkpoint stays whole until the new one is complete.
        """
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        partial = path.parent / f".{path.name}.partial"
        if self.global_rank == 0:
            if partial.exists():
                shutil.rmtree(partial)  # left by a crash
            path.parent.mkdir(parents=True, exist_ok=True)
        self.barrier()
        super().save_checkpoint(checkpoint, partial, storage_options)  # shards, and meta.pt on rank 0
        self.barrier()
        if self.global_rank == 0:
            swap_in(partial, path)
        self.barrier()


def swap_in(new: Path, path: Path) -> None:
    """Put the folder ``new`` at ``path`` atomically, removing what was there; ``new`` is consumed."""
    if path.is_symlink() or path.is_file():
        path.unlink()  # a single-file checkpoint (or a link) of an earlier run
    if not path.exists():
        os.rename(new, path)
    elif _exchange(new, path):  # one atomic step: path is the new folder, new holds the old one
        shutil.rmtree(new)
    else:  # no renameat2: a crash between the renames leaves the previous folder whole at .<name>.old
        old = path.parent / f".{path.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
        os.rename(new, path)
        shutil.rmtree(old)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``, not in Python's ``os``)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a distributed checkpoint folder (``meta.pt`` and ``.metadata`` in it)."""
    path = Path(path)
    return path.is_dir() and (path / META_FILE).is_file() and (path / ".metadata").is_file()


def consolidate(folder: str | os.PathLike) -> dict[str, Any]:
    """The whole checkpoint of a sharded folder in one process: ``meta.pt`` with the full ``state_dict``.

    Reads every shard (no process group needed) into host memory; tensors and plain data only.
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = Path(folder)
    checkpoint = torch.load(folder / META_FILE, map_location="cpu", weights_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(folder, Path(tmp) / "full.pt")
        full = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = full["state_dict"]
    return checkpoint


def sharded_model(
    module: L.LightningModule, config: PretrainedConfig, load_full: Callable[[], PreTrainedModel]
) -> PreTrainedModel:
    """``module``'s model sharded over its data-parallel mesh with the strategy's FSDP2 options.

    ``load_full`` builds the whole model with its weights; rank 0 alone calls it.
    """
    strategy, hp = module.trainer.strategy, module.hparams
    if hp.get("lora"):
        raise RunError(
            f"--model.lora is set and the strategy is {type(strategy).__name__} (FSDP2): LoRA is not sharded "
            "here. Train LoRA adapters with ddp (the frozen base fits once per GPU), or drop --model.lora."
        )
    mixed_precision = getattr(strategy, "mixed_precision", None)
    if mixed_precision is None:
        mixed_precision = str(module.trainer.precision).startswith("bf16")
    model = shard_model(
        lambda: AutoModelForCausalLM.from_config(config, **model_kwargs(hp)),
        load_full,
        module.device_mesh["data_parallel"],
        module.device,
        is_rank_zero=module.global_rank == 0,
        mixed_precision=mixed_precision,
        cpu_offload=getattr(strategy, "cpu_offload", False),
        gradient_checkpointing=hp.gradient_checkpointing,
    )
    model.train()
    if hp.compile:
        model.compile()  # after fully_shard, as torch's FSDP2 documentation does
    return model


def export_sharded(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    output_dir: str | os.PathLike,
    is_rank_zero: bool,
    overwrite: bool = False,
    run: str | os.PathLike | None = None,
) -> Path:
    """Gather the full weights of a sharded model (every process calls this) and save them on rank 0
    (``run``: the fit's log folder, recorded in the export)."""
    full = gather_full_state_dict(model)
    if is_rank_zero:
        with torch.device("meta"):
            whole = AutoModelForCausalLM.from_config(model.config)
        whole.load_state_dict(full, assign=True)
        whole.tie_weights()
        save_hf_folder(whole, tokenizer, output_dir, overwrite, run)
    return Path(output_dir)


@contextlib.contextmanager
def consolidated(path: str | os.PathLike) -> Iterator[Path]:
    """``path`` itself for a checkpoint file; for a sharded folder, a temporary file of its checkpoint."""
    if not is_sharded_checkpoint(path):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(consolidate(path), Path(tmp) / "full.ckpt")
        yield Path(tmp) / "full.ckpt"
