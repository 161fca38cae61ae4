"""Per-rank peak host memory on 2 CPU processes: a GPT-2 124M from a saved folder, DDP against FSDP2.

Each side is a fresh 2-process fit of ``CausalLMModule(model_name_or_path=FOLDER)`` (3 AdamW steps on
random blocks of 1 x 128 tokens, gradient clipping at 1.0, float32): ``ddp`` (every rank loads the whole
model) and ``fsdp2`` (``lm_lightning.FSDP2Strategy``: every rank builds the model on the meta device, rank 0
loads the weights and broadcasts them into the shards). Reported per rank: the peak resident memory
(``VmHWM``) at the end of the fit, and the same minus the peak after the imports (before any model exists).

    python bench/fsdp_memory.py                 # both, with glibc's default allocator settings
    MALLOC_MMAP_THRESHOLD_=65536 python bench/fsdp_memory.py    # large blocks go back to the OS at once
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py` from the repository root

GOAL_RATIO = 0.6
SEQ, STEPS = 128, 3


def _vm_hwm_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024


def child(mode: str, folder: str) -> None:
    """One side of the comparison; Lightning starts the second rank by running this script again."""
    import torch

    torch.set_num_threads(1)
    import lightning as L
    from torch.utils.data import DataLoader

    from lm_lightning import CausalLMModule, FSDP2Strategy

    baseline = _vm_hwm_mib()  # imports only
    blocks = [
        {"input_ids": t}
        for t in torch.randint(0, 50257, (8, SEQ), generator=torch.Generator().manual_seed(0))
    ]
    strategy = "ddp" if mode == "ddp" else FSDP2Strategy()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, precision="32-true", max_steps=STEPS,
        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    module = CausalLMModule(model_name_or_path=folder, learning_rate=1e-4, loss_chunk_size=None)
    trainer.fit(module, DataLoader(blocks, batch_size=1))
    peak = _vm_hwm_mib()
    print(f"RESULT {mode} rank={trainer.global_rank} peak={peak:.0f} baseline={baseline:.0f}", flush=True)


def save_model(folder: Path) -> None:
    """A randomly initialised GPT-2 124M (the ``gpt2`` shape) and a small local tokenizer, saved once."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lm_lightning import train_bpe_tokenizer
    from lm_lightning.data.corpus import python_docs_texts

    if (folder / "model.safetensors").exists():
        return
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)
    train_bpe_tokenizer(python_docs_texts()[:2000], 512, folder)


def main() -> None:
    if len(sys.argv) > 2:
        child(sys.argv[1], sys.argv[2])
        return
    folder = Path(tempfile.gettempdir()) / "lm_lightning_bench_gpt2_124m"
    save_model(folder)
    rows: dict[str, list[tuple[float, float]]] = {}
    for mode in ("ddp", "fsdp2"):
        out = subprocess.run(
            [sys.executable, __file__, mode, str(folder)], capture_output=True, text=True, timeout=1200
        )
        found = re.findall(r"RESULT (\w+) rank=(\d) peak=(\d+) baseline=(\d+)", out.stdout)
        if len(found) != 2:
            sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
        rows[mode] = [(float(p), float(b)) for _, _, p, b in sorted(found, key=lambda r: r[1])]
    allocator = os.environ.get("MALLOC_MMAP_THRESHOLD_", "default")
    print(f"GPT-2 124M, 2 CPU processes, batch 1 x {SEQ}, {STEPS} steps; MALLOC_MMAP_THRESHOLD_={allocator}")
    print("| side | peak rank 0 / rank 1 (MiB) | peak minus imports, rank 0 / rank 1 (MiB) |")
    for mode, ranks in rows.items():
        print(f"| {mode} | {ranks[0][0]:.0f} / {ranks[1][0]:.0f} | {ranks[0][0] - ranks[0][1]:.0f} / "
              f"{ranks[1][0] - ranks[1][1]:.0f} |")  # fmt: skip
    ratio = max(p for p, _ in rows["fsdp2"]) / max(p for p, _ in rows["ddp"])
    above = max(p - b for p, b in rows["fsdp2"]) / max(p - b for p, b in rows["ddp"])
    verdict = "meets" if ratio <= GOAL_RATIO else "misses"
    print(
        f"FSDP2 / DDP peak per rank: {ratio:.2f} ({verdict} the {GOAL_RATIO} goal); above imports {above:.2f}"
    )


if __name__ == "__main__":
    main()
