"""Fits for the step tests (tests/test_steps.py), in this process or on 2 processes (gloo, torchrun).

Data: 8 prompt-completion rows whose completions have 2^i tokens (i = 0..7), so that any two different sets of
rows have different numbers of targets, whatever the shuffle; text cut into full blocks. Tiny GPT-2 models.

    python -m torch.distributed.run --nproc_per_node 2 tests/steps_matrix.py OUT TOKENIZER

runs the 2-process cases and writes their results into OUT (``ddp-*.pt``, one file a rank where it matters).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import GPT2Config, GPT2LMHeadModel

from lm_lightning import CausalLMDataModule, CausalLMModule
from lm_lightning.curves import CurvesCallback
from lm_lightning.data.corpus import python_docs_texts
from lm_lightning.data.tokenizer import load_tokenizer
from lm_lightning.model.interrupts import CheckpointOnInterrupt
from lm_lightning.progress import TokensPerSecondProgressBar, ValidationSummary

NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
TINY = {"n_layer": 1, "n_head": 2, "n_embd": 32}


def write_data(folder: Path) -> Path:
    """``sft.jsonl`` (8 rows), ``text.txt`` (16+ blocks of 32) and small validation files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": f"Question {i}:", "completion": " the" * 2**i} for i in range(8)]
    (folder / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "sft-valid.jsonl").write_text(json.dumps(rows[0]) + "\n")
    texts = python_docs_texts()
    (folder / "text.txt").write_text("".join(texts[:8]))  # about 20 blocks of 32 tokens
    (folder / "text-valid.txt").write_text("".join(texts[500:502]))
    # Preference pairs whose sides have 2^i and 3i + 1 tokens: every pair of a different length.
    pairs = [
        {"prompt": f"Question {i}:", "chosen": " the" * 2**i, "rejected": " a" * (3 * i + 1)}
        for i in range(8)
    ]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (folder / "pairs-valid.jsonl").write_text(json.dumps(pairs[0]) + "\n")
    return folder


def dpo_base(folder: Path, tokenizer: str) -> str:
    """``folder/dpo-base``: a tiny pretrained GPT-2 (no dropout) and the tokenizer, for objective='dpo'."""
    base = folder / "dpo-base"
    if not (base / "config.json").is_file():
        tok = load_tokenizer(tokenizer)
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=len(tok), n_positions=160, **TINY, **NO_DROPOUT)
        GPT2LMHeadModel(config).save_pretrained(base)
        tok.save_pretrained(base)
    return str(base)


def data_module(folder: Path, tokenizer: str, kind: str, batch_size: int, packing: bool = False):
    """The data module of ``kind``: ``sft`` (rows of up to 160 tokens), ``text`` (blocks of 32), ``documents``
    (the same text, each text after an EOS attending to itself alone), or ``dpo`` (preference pairs)."""
    sft, documents = kind in ("sft", "dpo", "dpo-precomputed"), kind == "documents"
    name = {"sft": "sft", "dpo": "pairs", "dpo-precomputed": "pairs"}.get(kind, "text")
    files = {"train": str(folder / f"{name}.{'jsonl' if sft else 'txt'}")}
    files["validation"] = str(folder / f"{name}-valid.{'jsonl' if sft else 'txt'}")
    return CausalLMDataModule(
        tokenizer=tokenizer,
        data_files=files,
        block_size=160 if sft else 32,
        batch_size=batch_size,
        packing=packing,
        eos_between_texts=documents,
        document_masking=documents,
        cache_dir=str(folder / "cache"),
        seed=5,
    )


def module(kind: str, dropout: bool = False, **kwargs) -> CausalLMModule:
    config = {**TINY, "n_positions": 160 if kind == "sft" else 32, **({} if dropout else NO_DROPOUT)}
    return CausalLMModule(
        model_config=config, **{"learning_rate": 1e-2, "lr_scheduler": "constant", **kwargs}
    )


def trainer(root: Path, devices: int, **kwargs) -> L.Trainer:
    settings = dict(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(root),
    )
    return L.Trainer(**{**settings, **kwargs})


class FirstGradient(L.Callback):
    """The whole gradient of the first optimizer step, before clipping (all-reduced under DDP)."""

    def __init__(self) -> None:
        self.grad: torch.Tensor | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:
            self.grad = torch.cat([p.grad.detach().flatten() for p in pl_module.model.parameters()])


def first_gradient(
    folder, tokenizer, kind, batch_size, accumulate=1, devices=1, packing=False
) -> torch.Tensor:
    """The first step's gradient of a fit of ``kind`` data split as given (dropout off)."""
    L.seed_everything(0)
    if kind.startswith("dpo"):  # the DPO loss of the tiny base against itself: a mean over pairs
        dpo = {"precompute_reference": kind == "dpo-precomputed"}
        model = CausalLMModule(model_name_or_path=dpo_base(folder, tokenizer), objective="dpo", dpo=dpo)
    else:
        model = module(kind)
    grad = FirstGradient()
    fit = trainer(folder / "runs", devices, max_steps=1, accumulate_grad_batches=accumulate, callbacks=[grad])
    fit.fit(model, data_module(folder, tokenizer, kind, batch_size, packing))
    return grad.grad


# ----------------------------------------------------------------------------- resume after any stop
class Samples(L.Callback):
    """The rows (``sample_index``) of each micro-batch trained, with its step, read from the batches."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.global_step, list(batch["sample_index"])))


class SeedPerRank(L.Callback):
    """Different dropout masks on each rank from the start of a fresh fit."""

    def on_train_start(self, trainer, pl_module):
        if trainer.global_step == 0:
            torch.manual_seed(1000 + trainer.global_rank)


class TermAtStep(L.Callback):
    """SIGTERM this process in the middle of optimizer step ``step`` (as a scheduler would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def resume_chain(folder: Path, tokenizer: str, batch_size: int, devices: int) -> dict:
    """A straight 2-epoch fit (S steps an epoch, dropout on and different on each rank, constant LR), and the
    same fit cut by every kind of stop: ``max_epochs=1``; resumed with ``max_epochs=2`` and SIGTERMed in step
    S + 1; resumed with ``max_steps=2S - 1`` (a stop mid-epoch); resumed with ``max_steps=2S``. Returns each
    one's exit code, weights, steps and the rows it trained."""
    out: dict = {}
    ckpts = folder / f"chain-{devices}"
    last = str(ckpts / "last.ckpt")

    def run(name, ckpt_path=None, extra=(), **limits):
        L.seed_everything(0)
        samples = Samples()
        dirpath = ckpts if name != "straight" else folder / f"straight-{devices}"
        saver = ModelCheckpoint(dirpath=dirpath, save_top_k=0, save_last=True)
        callbacks = [samples, SeedPerRank(), CheckpointOnInterrupt(), saver, *extra]
        fit = trainer(folder / "runs", devices, callbacks=callbacks, enable_checkpointing=True, **limits)
        model = module("text", dropout=True)
        try:
            fit.fit(model, data_module(folder, tokenizer, "text", batch_size), ckpt_path=ckpt_path)
            code = 0
        except SystemExit as stop:
            code = stop.code
        out[name] = {"code": code, "samples": samples.seen, "step": fit.global_step}
        out[name]["weights"] = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
        return fit

    steps = run("straight", max_epochs=2).num_training_batches  # S: steps an epoch (one micro-batch a step)
    out["steps_per_epoch"] = steps
    run("epochs1", max_epochs=1)
    run("term", last, [TermAtStep(steps + 1)], max_epochs=2)
    run("steps-1", last, max_epochs=2, max_steps=2 * steps - 1)
    run("steps", last, max_epochs=2, max_steps=2 * steps)
    return out


# ----------------------------------------------------------------------------- one sync a step
SYNCS = ("item", "cpu", "tolist")
DATA_LOADING = (os.path.join("torch", "utils", "data", ""), os.path.join("torchdata", ""))
COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce", "barrier",
               "all_gather_object", "broadcast_object_list", "reduce_scatter_tensor")  # fmt: skip


class SyncCounter(L.Callback):
    """Counts ``Tensor.item/.cpu/.tolist`` and ``torch.distributed`` collectives between optimizer-step
    boundaries (from the end of a step's last micro-batch to the end of the next step's)."""

    def __init__(self) -> None:
        self.per_step: list[dict[str, int]] = []
        self.counts = dict.fromkeys((*SYNCS, "collectives"), 0)
        self._step = 0
        self._undo: list = []

    def on_train_start(self, trainer, pl_module):
        def counting(owner, name, key):
            original = getattr(owner, name)

            def wrapper(*args, **kwargs):
                # Not the loader's own host-side work (a new epoch's iterator draws its seed with .item()).
                caller = sys._getframe(1).f_code.co_filename
                if not any(part in caller for part in DATA_LOADING):
                    self.counts[key] += 1
                return original(*args, **kwargs)

            setattr(owner, name, wrapper)
            self._undo.append((owner, name, original))

        for name in SYNCS:
            counting(torch.Tensor, name, name)
        for name in COLLECTIVES:
            if hasattr(torch.distributed, name):
                counting(torch.distributed, name, "collectives")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._step:
            self._step = trainer.global_step
            self.per_step.append(dict(self.counts))
            self.counts = dict.fromkeys(self.counts, 0)

    def on_train_end(self, trainer, pl_module):
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)


class PoisonedModule(CausalLMModule):
    """A NaN loss in micro-batch ``micro`` of optimizer step ``step`` on process ``rank`` (None: all)."""

    poison: tuple[int, int, int | None] | None = None

    def _nll(self, batch, router_aux_loss=False):
        nll, n, aux = super()._nll(batch, router_aux_loss)
        if self.training and self.poison is not None:
            step, micro, rank = self.poison
            here = self.trainer.global_step == step and self._micro == micro
            if here and rank in (None, self.trainer.global_rank):
                nll = nll * float("nan")
        return nll, n, aux

    def training_step(self, batch, batch_idx):
        self._micro = batch_idx % self.trainer.accumulate_grad_batches
        return super().training_step(batch, batch_idx)


class Snapshots(L.Callback):
    """The weights and AdamW's moments at the start of each optimizer step."""

    def __init__(self) -> None:
        self.at: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step not in self.at:
            state = trainer.optimizers[0].state
            self.at[trainer.global_step] = {
                "weights": [p.detach().clone() for p in pl_module.parameters()],
                "moments": [state[p]["exp_avg"].clone() for p in pl_module.parameters() if p in state],
            }


def counted_fit(folder: Path, tokenizer: str, devices: int, poison=None, action="skip", steps=4) -> dict:
    """A fit with the CLI's callbacks and clipping, 2 micro-batches a step, counting syncs a step; ``poison``
    a micro-batch (``PoisonedModule``). Returns the counts and the snapshots of weights and moments."""
    L.seed_everything(0)
    model = PoisonedModule(model_config={**TINY, "n_positions": 32, **NO_DROPOUT}, on_nonfinite_loss=action)
    model.poison = poison
    counter, snapshots = SyncCounter(), Snapshots()
    callbacks = [TokensPerSecondProgressBar(refresh_rate=1), ValidationSummary(), CheckpointOnInterrupt(),
                 CurvesCallback(), ModelCheckpoint(dirpath=folder / "counted", save_top_k=0,
                 every_n_train_steps=1000), counter, snapshots]  # fmt: skip
    fit = trainer(folder / "runs", devices, max_steps=steps, accumulate_grad_batches=2, gradient_clip_val=1.0,
                  callbacks=callbacks, enable_progress_bar=True, enable_checkpointing=True)  # fmt: skip
    fit.fit(model, data_module(folder, tokenizer, "text", 2))
    return {"per_step": counter.per_step, "snapshots": snapshots.at, "optimizer": fit.optimizers[0]}


def main(out: Path, tokenizer: str) -> None:
    rank = int(os.environ.get("RANK", 0))
    folder = write_data(out / "data") if rank == 0 else out / "data"
    if rank == 0:
        dpo_base(folder, tokenizer)
    torch.distributed.init_process_group("gloo")  # Lightning takes this group over
    torch.distributed.barrier()
    torch.set_num_threads(1)
    results = {}
    for name, kind, batch, accumulate, packing in [
        ("sft-4", "sft", 4, 1, False),
        ("sft-2x2", "sft", 2, 2, False),
        ("sft-packed-2x2", "sft", 2, 2, True),
        ("text-2x2", "text", 2, 2, False),
        ("dpo-2", "dpo", 2, 1, False),
        ("dpo-precomputed-2", "dpo-precomputed", 2, 1, False),  # each process scores its share of the pairs
    ]:
        results[name] = first_gradient(folder, tokenizer, kind, batch, accumulate, 2, packing)
    chain = resume_chain(folder, tokenizer, batch_size=2, devices=2)
    counted = counted_fit(folder, tokenizer, 2, poison=(1, 0, 1), action="skip")
    weights = [[w for w in counted["snapshots"][s]["weights"]] for s in (1, 2)]
    torch.save(
        {"grads": results, "chain": chain, "per_step": counted["per_step"], "weights": weights},
        out / f"ddp-rank{rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
