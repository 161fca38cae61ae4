"""The optimizer step as the unit of the loss: the same update however a global batch is split into processes
and micro-batches, the global order of rows, one host sync a step, steps on validation boundaries."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from conftest import quiet_trainer, run_cli, write_tiny_config
from steps_matrix import (
    NO_DROPOUT,
    TINY,
    counted_fit,
    data_module,
    dpo_base,
    first_gradient,
    module,
    trainer,
    write_data,
)
from torch.utils.data import DataLoader

from lm_lightning import CausalLMDataModule, CausalLMModule
from lm_lightning.data.examples import BlockCollator, DocumentMaskingCollator, PadCollator, real_tokens
from lm_lightning.data.global_batches import (
    GlobalBatchSampler,
    MicroBatch,
    StepCollator,
    StepRows,
    global_batch_loader,
    row_units,
)
from lm_lightning.data.sampling import PADDING
from lm_lightning.errors import RunError
from lm_lightning.model.boundaries import check_epoch_fraction


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("steps") / "data")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------- the global order
def _steps(units, batch_size, accumulate, world_size, limit=None):
    """The rows of each optimizer step, all processes together, and each step's planned total."""
    split = (batch_size, accumulate, world_size)
    ranks = [list(GlobalBatchSampler(units, *split, r, 3, limit)) for r in range(world_size)]
    assert len({len(r) for r in ranks}) == 1  # the same number of micro-batches on every process
    steps, i = [], 0
    while i < len(ranks[0]):
        n = ranks[0][i].step_micro_batches
        micro = [mb for r in ranks for mb in r[i : i + n]]
        rows = sorted(row for mb in micro for row in mb.rows if row != PADDING)
        assert {mb.step_units for mb in micro} == {int(units[rows].sum())}
        assert all(len(mb.rows) == batch_size for mb in micro)
        steps.append(rows)
        i += n
    return steps


def test_each_step_takes_the_same_rows_however_the_global_batch_is_split():
    units = np.arange(1, 51)  # 50 rows, a global batch of 8: 6 full steps and one of 2 rows, padded
    one = _steps(units, 8, 1, 1)
    assert [len(s) for s in one] == [8] * 6 + [2]
    assert sorted(r for s in one for r in s) == list(range(50))  # each row once an epoch
    for split in [(4, 2, 1), (2, 4, 1), (4, 1, 2), (2, 2, 2), (1, 2, 4)]:
        assert _steps(units, *split) == one, split
    # limit_train_batches cuts the epoch after that many micro-batches: the cut step's total is its own.
    assert [len(s) for s in _steps(units, 2, 2, 1, limit=5)] == [4, 4, 2]
    assert len(_steps(units, 2, 2, 1, limit=0.5)) == 6  # 12 of 25 micro-batches, as Lightning counts them
    sampler = GlobalBatchSampler(units, 4, 1, 1, 0, seed=3)
    sampler.set_epoch(1)
    assert [mb.rows for mb in sampler] != [mb.rows for mb in GlobalBatchSampler(units, 4, 1, 1, 0, seed=3)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_loader_state_is_the_global_position_and_resumes_it(num_workers):
    rows = [{"input_ids": torch.full((4,), i)} for i in range(30)]
    units = np.full(30, 3)

    def loader():
        return global_batch_loader(rows, units, batch_size=4, trainer=None, seed=1, num_workers=num_workers,
                                   pin_memory=False)  # fmt: skip

    full = loader()
    full.sampler.set_epoch(2)
    every = [batch["sample_index"] for batch in full]
    cut = loader()
    cut.sampler.set_epoch(2)
    iterator = iter(cut)
    first = [next(iterator)["sample_index"] for _ in range(3)]
    state = cut.state_dict()  # with workers, the sampler has drawn ahead: torchdata keeps the position given
    if num_workers == 0:
        assert cut.sampler.state_dict() == {**cut.sampler.state_dict(), "epoch": 2, "consumed": 12}
    resumed = loader()
    resumed.load_state_dict(state)  # before Lightning sets the epoch: the state carries it
    rest = [batch["sample_index"] for batch in resumed]
    assert first + rest == every
    assert rest[-1][2:] == [PADDING, PADDING]  # 30 rows: the last micro-batch has 2 real rows
    assert all(batch["input_ids"][0, 0] == batch["sample_index"][0] for batch in loader())


@pytest.mark.parametrize("kind", ["sft", "text", "documents"])
def test_per_row_targets_are_counted_as_the_loss_counts_them(data, bpe_tokenizer_path, kind):
    dm = data_module(data, bpe_tokenizer_path, kind, 4)
    dm.setup("fit")
    train = dm.datasets["train"]
    units = row_units(train, "targets", dm.tokenizer.eos_token_id if kind == "documents" else None)
    collate = dm._collate_fn()
    counted = []
    for i in range(len(train)):
        batch = collate([train[i]]) if collate else {"input_ids": train[i]["input_ids"][None]}
        counted.append(int((batch.get("labels", batch["input_ids"])[:, 1:] != -100).sum()))
    assert units.tolist() == counted
    if kind == "text":
        assert set(counted) == {31}  # full blocks of 32
    else:
        assert len(set(counted)) > 1  # completions of 2^i tokens; blocks whose documents end inside
    assert row_units(train, "rows").tolist() == [1] * len(train)


# ----------------------------------------------------------------------------- one step, however split
def test_one_step_gradient_does_not_depend_on_the_split(data, bpe_tokenizer_path, two_process_steps):
    """Completions of 2^i tokens: two sets of rows never have the same number of targets, whatever the
    shuffle, so a mean of per-micro-batch means (Lightning's accumulation, DDP's averaging) would differ."""
    reference = first_gradient(data, bpe_tokenizer_path, "sft", 8)
    got = {
        "4 x 2": first_gradient(data, bpe_tokenizer_path, "sft", 4, 2),
        "2 x 4": first_gradient(data, bpe_tokenizer_path, "sft", 2, 4),
        "packed, 8": first_gradient(data, bpe_tokenizer_path, "sft", 8, packing=True),
        "packed, 2 x 4": first_gradient(data, bpe_tokenizer_path, "sft", 2, 4, packing=True),
    }
    for rank, results in enumerate(two_process_steps):  # all-reduced: the same gradient on both
        got.update({f"2 processes, {k} (rank {rank})": v for k, v in results["grads"].items() if "sft" in k})
    differences = {name: _relative(grad, reference) for name, grad in got.items()}
    print(differences)
    assert len(differences) == 10 and max(differences.values()) < 1e-5


def test_full_text_blocks_stay_exact_and_document_masking_too(data, bpe_tokenizer_path, two_process_steps):
    text = first_gradient(data, bpe_tokenizer_path, "text", 8)
    assert _relative(first_gradient(data, bpe_tokenizer_path, "text", 4, 2), text) < 1e-5
    for rank in two_process_steps:
        assert _relative(rank["grads"]["text-2x2"], text) < 1e-5
    documents = first_gradient(data, bpe_tokenizer_path, "documents", 8)  # fewer targets in some blocks
    assert _relative(first_gradient(data, bpe_tokenizer_path, "documents", 2, 4), documents) < 1e-5
    assert _relative(documents, text) > 1e-3  # documents are kept apart: another loss


def test_one_dpo_step_is_the_mean_over_its_pairs_however_split(data, bpe_tokenizer_path, two_process_steps):
    """Pairs whose sides have other lengths in every pair: batch 4, 2 x accumulate 2, 2 processes x 2."""
    reference = first_gradient(data, bpe_tokenizer_path, "dpo", 4)
    got = {"2 x 2": first_gradient(data, bpe_tokenizer_path, "dpo", 2, 2)}
    for rank, results in enumerate(two_process_steps):  # the reference a copy, or precomputed by both ranks
        got[f"2 processes x 2 (rank {rank})"] = results["grads"]["dpo-2"]
        got[f"2 processes x 2, precomputed (rank {rank})"] = results["grads"]["dpo-precomputed-2"]
    assert reference.norm() > 0 and max(_relative(g, reference) for g in got.values()) < 1e-5
    assert _relative(first_gradient(data, bpe_tokenizer_path, "dpo", 2), reference) > 1e-3  # 2 pairs alone


def test_a_dpo_step_with_padding_rows_is_the_mean_over_its_real_pairs(tmp_path, data, bpe_tokenizer_path):
    """7 pairs, 4 a step: the second step has 3, as one micro-batch of 4 rows (one of them padding) or as 2
    of 2 rows (the second half padding). A mean of micro-batch means, or a padding pair counted, differs."""
    (tmp_path / "pairs.jsonl").write_text("".join((data / "pairs.jsonl").read_text().splitlines(True)[:7]))
    (tmp_path / "pairs-valid.jsonl").write_text((data / "pairs-valid.jsonl").read_text())
    grads = {}

    class StepGradients(L.Callback):
        def __init__(self, split):
            self.split = split

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads[self.split, trainer.global_step] = torch.cat(
                [p.grad.flatten() for p in pl_module.parameters()]
            )

    for split in [(4, 1), (2, 2)]:
        L.seed_everything(0)
        model = CausalLMModule(model_name_or_path=dpo_base(data, bpe_tokenizer_path), objective="dpo",
                               learning_rate=0.0, lr_scheduler="constant")  # fmt: skip
        fit = trainer(tmp_path / "runs", 1, max_epochs=1, accumulate_grad_batches=split[1],
                      callbacks=[StepGradients(split)])  # fmt: skip
        fit.fit(model, data_module(tmp_path, bpe_tokenizer_path, "dpo", split[0]))
    assert sorted(step for _, step in grads) == [0, 0, 1, 1]
    for step in (0, 1):
        assert _relative(grads[(2, 2), step], grads[(4, 1), step]) < 1e-5, step


# ----------------------------------------------------------------------------- one sync a step
def test_one_host_sync_and_one_collective_an_optimizer_step(data, bpe_tokenizer_path, two_process_steps):
    """Counted with the CLI's callbacks (progress bar with tok/s, validation summary, interrupts, periodic
    checkpoints), gradient clipping, 2 micro-batches a step, an epoch's shorter last step, a skipped step.

    The first step's interval also holds the fit's start; a logger would read the logged host tensors."""
    one = counted_fit(data, bpe_tokenizer_path, devices=1, steps=6)["per_step"]
    assert len(one) == 6
    assert one[1:] == [{"item": 0, "cpu": 0, "tolist": 1, "collectives": 0}] * 5
    for rank in two_process_steps:  # the non-finite flag and the interrupt signal travel with the loss
        assert rank["per_step"][1:] == [{"item": 0, "cpu": 0, "tolist": 1, "collectives": 1}] * 3


# ----------------------------------------------------------------------------- settings refused
def test_a_loader_without_step_totals_is_refused_under_accumulation(tmp_path, bpe_tokenizer_path):
    L.seed_everything(0)
    blocks = torch.randint(1, 500, (8, 32), generator=torch.Generator().manual_seed(0))
    loader = DataLoader([{"input_ids": b} for b in blocks], batch_size=2)
    trainer = quiet_trainer(tmp_path, max_steps=1, accumulate_grad_batches=2, limit_val_batches=0)
    with pytest.raises(RunError, match="carry no 'step_units'.*2 micro-batch"):
        trainer.fit(module("text", tokenizer=bpe_tokenizer_path), train_dataloaders=loader)
    one = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0)  # a micro-batch is the whole step: exact
    one.fit(module("text", tokenizer=bpe_tokenizer_path), train_dataloaders=loader)
    assert one.global_step == 1


def test_validation_inside_an_accumulation_window_is_refused_before_any_compute(
    tmp_path, bpe_tokenizer_path, doc_texts, monkeypatch
):
    config = write_tiny_config(tmp_path, bpe_tokenizer_path, doc_texts)
    monkeypatch.chdir(tmp_path)
    window = ["--trainer.accumulate_grad_batches", "2", "--trainer.val_check_interval", "3"]
    assert run_cli(monkeypatch, "fit", "--config", str(config), *window) == 2
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()

    class Trainer:  # the settings a fraction of the epoch is checked against, once its length is known
        accumulate_grad_batches, val_check_interval, check_val_every_n_epoch = 2, 0.5, 1

    check_epoch_fraction(Trainer, 8)  # every 4 training batches: every 2 steps
    with pytest.raises(RunError, match=r"val_check_interval=0.5 of an epoch of 10 .* every 5 batches"):
        check_epoch_fraction(Trainer, 10)


def test_streaming_with_document_masking_is_refused(tmp_path):
    with pytest.raises(ValueError, match="document_masking=True with streaming=True is not supported"):
        CausalLMDataModule(
            tokenizer="gpt2", data_files={"train": "a.txt", "validation": "b.txt"}, streaming=True,
            eos_between_texts=True, document_masking=True,
        )  # fmt: skip


def test_padding_rows_are_a_real_row_of_the_step_with_no_target():
    micro = MicroBatch((2, PADDING), filler=1, step_units=2, step_micro_batches=1)
    blocks = StepRows([{"input_ids": torch.tensor([i, i])} for i in range(3)])
    for collate in (None, BlockCollator(), DocumentMaskingCollator(eos_token_id=99)):
        batch = StepCollator(collate)(blocks[micro])
        assert batch["input_ids"].tolist() == [[2, 2], [1, 1]], collate
        assert (batch["labels"][1] == -100).all() and (batch["labels"][0, 1:] == 2).all(), collate
        assert batch["sample_index"] == [2, PADDING] and batch["step_units"] == 2
    assert real_tokens(StepCollator(BlockCollator())(blocks[micro])) == 2  # the padding row is not counted
    rows = StepRows([{"input_ids": torch.arange(i + 1), "labels": torch.arange(i + 1)} for i in range(3)])
    batch = StepCollator(PadCollator(pad_token_id=0))(rows[micro])
    assert batch["labels"].tolist() == [[0, 1, 2], [-100, -100, -100]] and real_tokens(batch) == 3


def test_extra_sums_ride_in_the_steps_one_sync(data, bpe_tokenizer_path):
    """What a preference objective needs (its own per-step means: a reward margin...), with no extra sync."""

    class WithExtras(CausalLMModule):
        def training_step(self, batch, batch_idx):
            nll, n_targets, _ = self._nll(batch)
            extras = {"nll_again": nll.detach(), "targets_seen": n_targets.float()}
            return self.step_loss.objective(self, batch, nll, n_targets, batch_idx, extras=extras)

    L.seed_everything(0)
    model = WithExtras(model_config={**TINY, "n_positions": 32, **NO_DROPOUT}, lr_scheduler="constant")
    fit = trainer(data / "runs", 1, max_steps=2, accumulate_grad_batches=2)
    fit.fit(model, data_module(data, bpe_tokenizer_path, "text", 2))
    metrics = fit.callback_metrics
    assert metrics["train/nll_again"].item() == pytest.approx(metrics["train/loss"].item(), rel=1e-6)
    assert metrics["train/targets_seen"].item() == 1.0  # each target counted once, over the step's targets
