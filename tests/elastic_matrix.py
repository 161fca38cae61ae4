"""Fits for tests/test_elastic.py: checkpoints resumed on another number of processes.

Text cut into 29 blocks of 32 tokens; a global batch of 4 (1 process x batch 4, or 2 processes x batch 2): 8
optimizer steps an epoch, the last with 1 real row. Tiny GPT-2, dropout off, a constant LR of 1e-3: float32's
rounding differs with the number of processes (the gradients are summed in another order), and AdamW, which
divides each gradient by its own magnitude, grows it; at 1e-2 the weights of 10 steps on 1 and on 2 processes
differ by about 1e-4, at 1e-3 by about 4e-6. Each fit records the
rows of every micro-batch it trained (``sample_index``, read from the batches) with its step, and its weights.

    python -m torch.distributed.run --nproc_per_node 2 tests/elastic_matrix.py OUT TOKENIZER

runs the 2-process fits (DDP and FSDP2) and writes each rank's results into ``OUT/elastic-rank<r>.pt``; the
checkpoint of the 1-process cut (``fit(..., 1, "one-cut", CUT)``) must be in ``OUT/data/one-cut`` first.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from steps_matrix import Samples, module, trainer

from lm_lightning import CausalLMDataModule, FSDP2Strategy
from lm_lightning.data.corpus import python_docs_texts
from lm_lightning.model.interrupts import CheckpointOnInterrupt
from lm_lightning.model.parallel import gather_full_state_dict, is_sharded

CUT, END = 5, 10  # the step the first fit stops at, and the one the resumed fit ends at (in epoch 1)
GLOBAL_BATCH = 4
LR = 1e-3


def write_text(folder: Path) -> Path:
    """``folder/text.txt`` (29 blocks of 32 tokens with the tests' tokenizer) and a validation file."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = python_docs_texts()
    (folder / "text.txt").write_text("".join(texts[:14]))
    (folder / "text-valid.txt").write_text("".join(texts[500:502]))
    return folder


def data(folder: Path, tokenizer: str, batch_size: int) -> CausalLMDataModule:
    files = {"train": str(folder / "text.txt"), "validation": str(folder / "text-valid.txt")}
    return CausalLMDataModule(
        tokenizer=tokenizer, data_files=files, block_size=32, batch_size=batch_size,
        cache_dir=str(folder / "cache"), seed=5,
    )  # fmt: skip


def fit(
    folder: Path, tokenizer: str, devices: int, name: str, max_steps: int, ckpt_path=None, fsdp=False,
    batch_size=None, accumulate=1,
):  # fmt: skip
    """One fit on ``devices`` processes (global batch 4, unless ``batch_size`` and ``accumulate`` say
    another) to ``max_steps``, its ``last.ckpt`` in ``folder/name``. Returns what it trained (each
    micro-batch's step and rows on this process), its step and epoch, Lightning's micro-batch counters and
    (rank 0) its full weights."""
    L.seed_everything(0)
    samples = Samples()
    saver = ModelCheckpoint(dirpath=folder / name, save_top_k=0, save_last=True)
    strategy = FSDP2Strategy(timeout_minutes=2) if fsdp else ("ddp" if devices > 1 else "auto")
    run = trainer(
        folder / "runs", devices, strategy=strategy, max_steps=max_steps, enable_checkpointing=True,
        callbacks=[samples, CheckpointOnInterrupt(), saver], accumulate_grad_batches=accumulate,
    )  # fmt: skip
    model = module("text", learning_rate=LR)
    run.fit(model, data(folder, tokenizer, batch_size or GLOBAL_BATCH // devices), ckpt_path=ckpt_path)
    weights = gather_full_state_dict(model.model) if is_sharded(model.model) else model.model.state_dict()
    progress = run.fit_loop.epoch_loop.batch_progress
    return {
        "samples": samples.seen,
        "step": run.global_step,
        "epoch": run.current_epoch,
        "batches": (progress.current.completed, progress.total.completed),
        "weights": {k: v.detach().clone() for k, v in weights.items()},
    }


def main(out: Path, tokenizer: str) -> None:
    rank = int(os.environ.get("RANK", 0))
    torch.distributed.init_process_group("gloo")  # Lightning takes this group over
    torch.set_num_threads(1)
    folder = out / "data"
    results = {
        "straight": fit(folder, tokenizer, 2, "two-straight", END),
        "cut": fit(folder, tokenizer, 2, "two-cut", CUT),
        # 1 process x batch 4, cut at step CUT, resumed on 2 processes x batch 2
        "from-one": fit(
            folder, tokenizer, 2, "from-one", END, ckpt_path=str(folder / "one-cut" / "last.ckpt")
        ),
        "fsdp-straight": fit(folder, tokenizer, 2, "fsdp-straight", END, fsdp=True),
        "fsdp-cut": fit(folder, tokenizer, 2, "fsdp-cut", CUT, fsdp=True),
    }
    torch.save(results, out / f"elastic-rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
