"""Exact resume after SIGTERM and SIGKILL, atomic checkpoint writes, and non-finite losses."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import GradNorms, quiet_trainer
from datasets import Dataset, DatasetDict
from lightning.pytorch.callbacks import ModelCheckpoint
from steps_matrix import PoisonedModule, Snapshots, resume_chain, write_data

from lm_lightning import CausalLMDataModule
from lm_lightning.cli import main
from lm_lightning.model import checkpointing as ckpt_module
from lm_lightning.model.checkpointing import AtomicCheckpointIO
from lm_lightning.model.faults import NonFiniteLossError
from lm_lightning.model.interrupts import CheckpointOnInterrupt

KILLER = '''
import os, signal
import lightning as L
import torch

class KillAtStep(L.Callback):
    """SIGKILL this process in the middle of the optimizer step after ``step`` (no cleanup of any kind)."""

    def __init__(self, step: int):
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class TermAtStep(L.Callback):
    """SIGTERM this process (as a scheduler would) in the middle of the optimizer step after ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class SeedPerRank(L.Callback):
    """A different random stream on each rank from the start of a fresh fit (dropout differs across ranks)."""

    def on_train_start(self, trainer, pl_module):
        if trainer.global_step == 0:
            torch.manual_seed(1000 + trainer.global_rank)
'''


def _resume_config(
    tmp_path: Path, tokenizer_path: str, doc_texts: list[str], save_dir: str, kill_at=None, term_at=None
):
    (tmp_path / "train.txt").write_text("".join(doc_texts[:20]))  # 50 blocks: 13 batches, the last of 2
    (tmp_path / "valid.txt").write_text("".join(doc_texts[500:512]))
    callbacks = [
        # Sampling at each validation must not shift the training's random state.
        {
            "class_path": "lm_lightning.TextGenerationCallback",
            "init_args": {"prompts": ["The"], "decodings": ["top_k"], "max_new_tokens": 3},
        }
    ]
    if kill_at is not None:
        callbacks.append({"class_path": "killer.KillAtStep", "init_args": {"step": kill_at}})
    if term_at is not None:
        callbacks.append({"class_path": "killer.TermAtStep", "init_args": {"step": term_at}})
    return {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 20,  # crosses the end of the first epoch (13 steps)
            "limit_val_batches": 2,
            "enable_model_summary": False,
            "enable_progress_bar": False,
            "callbacks": callbacks,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": save_dir, "name": "r"},
            },
        },
        # GPT-2's dropout is on (0.1): the random state must be restored for the same weights.
        "model": {
            "model_config": {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 32},
            "learning_rate": 3e-3,
            "warmup_steps": 2,
        },
        "data": {
            "tokenizer": tokenizer_path,
            "data_files": {"train": str(tmp_path / "train.txt"), "validation": str(tmp_path / "valid.txt")},
            "block_size": 32,
            "batch_size": 4,
            "cache_dir": str(tmp_path / "cache"),
        },
        "last_checkpoint": {"every_n_train_steps": 4},
    }


def _fit(tmp_path: Path, config: dict, name: str, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "lm_lightning", "fit", "--config", str(path), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


@pytest.mark.slow
def test_ddp_fit_killed_mid_epoch_resumes_every_rank_to_the_same_weights(
    tmp_path, bpe_tokenizer_path, doc_texts
):
    # 2 processes (gloo): 25 blocks a rank, 7 steps an epoch; killed in step 10, resumed from step 8.
    (tmp_path / "killer.py").write_text(KILLER)
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.max_steps", "12"]
    ddp += ["--trainer.callbacks+=killer.SeedPerRank"]  # ranks draw different dropout masks
    whole = _fit(tmp_path, _resume_config(tmp_path, bpe_tokenizer_path, doc_texts, "whole"), "whole", *ddp)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed_config = _resume_config(tmp_path, bpe_tokenizer_path, doc_texts, "cut", kill_at=9)
    killed = _fit(tmp_path, killed_config, "killed", *ddp)
    assert killed.returncode == -9, killed.stderr[-3000:]
    last = tmp_path / "cut" / "r" / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 8 and saved["epoch"] == 1
    states = saved[ckpt_module.RNG_KEY]  # one random state per rank, written by rank 0
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])

    resumed_config = _resume_config(tmp_path, bpe_tokenizer_path, doc_texts, "cut")
    resumed = _fit(tmp_path, resumed_config, "resumed", *ddp, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole_last = tmp_path / "whole" / "r" / "version_0" / "checkpoints" / "last.ckpt"
    expected = torch.load(whole_last, map_location="cpu", weights_only=True)
    got = torch.load(last, map_location="cpu", weights_only=True)
    assert expected["global_step"] == got["global_step"] == 12
    # DDP averages the ranks' gradients: the weights depend on rank 1's dropout masks after the resume too.
    diffs = {k: (v - got["state_dict"][k]).abs().max().item() for k, v in expected["state_dict"].items()}
    assert max(diffs.values()) < 1e-6, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.slow
def test_fit_interrupted_then_killed_resumes_to_the_same_weights(
    tmp_path, bpe_tokenizer_path, doc_texts, capsys, monkeypatch
):
    (tmp_path / "killer.py").write_text(KILLER)
    whole = _fit(tmp_path, _resume_config(tmp_path, bpe_tokenizer_path, doc_texts, "whole"), "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    last = tmp_path / "cut" / "r" / "version_0" / "checkpoints" / "last.ckpt"

    # SIGTERM during step 3, long before the first periodic checkpoint (step 4): the step is finished,
    # checkpointed, and the process exits with 128 + 15.
    termed = _fit(tmp_path, _resume_config(tmp_path, bpe_tokenizer_path, doc_texts, "cut", term_at=2), "term")
    assert termed.returncode == 143, termed.stderr[-3000:]
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 3

    # Resumed, then SIGKILLed during step 10 (no cleanup at all): the step-8 periodic checkpoint is whole.
    killed_config = _resume_config(tmp_path, bpe_tokenizer_path, doc_texts, "cut", kill_at=9)
    killed = _fit(tmp_path, killed_config, "killed", "--ckpt_path", "last")
    assert killed.returncode == -9
    assert f"Resuming from {last.relative_to(tmp_path)}: epoch 0, step 3 (written " in killed.stdout
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 8 and saved["epoch"] == 0  # mid-epoch: batch 8 of 13

    resumed_config = _resume_config(tmp_path, bpe_tokenizer_path, doc_texts, "cut")
    resumed = _fit(tmp_path, resumed_config, "resumed", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "mid-epoch" not in resumed.stderr  # Lightning's warning for a loader it cannot resume
    assert not (tmp_path / "cut" / "r" / "version_1").exists()  # went on in the run's own folder

    whole_last = tmp_path / "whole" / "r" / "version_0" / "checkpoints" / "last.ckpt"
    expected = torch.load(whole_last, map_location="cpu", weights_only=True)
    got = torch.load(last, map_location="cpu", weights_only=True)
    assert expected["global_step"] == got["global_step"] == 20
    diffs = {k: (v - got["state_dict"][k]).abs().max().item() for k, v in expected["state_dict"].items()}
    assert max(diffs.values()) < 1e-6, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    # The optimizer went on from the same moments.
    exp_opt, got_opt = expected["optimizer_states"][0]["state"], got["optimizer_states"][0]["state"]
    assert all(torch.allclose(exp_opt[i]["exp_avg_sq"], got_opt[i]["exp_avg_sq"], atol=1e-9) for i in exp_opt)

    # Resuming the finished run says so and stops at once: nothing trained, nothing exported.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys, "argv", ["lm_lightning", "fit", "--config", "resumed.yaml", "--ckpt_path", "last"]
    )
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    assert (
        "already complete at step 20 (max_steps=20); raise --trainer.max_steps to continue."
        in capsys.readouterr().out
    )


CUTS = ("epochs1", "term", "steps-1", "steps")


@pytest.mark.parametrize("processes", [1, 2])
def test_resume_after_any_stop_equals_a_straight_fit(
    tmp_path, bpe_tokenizer_path, two_process_steps, processes
):
    """A stop by max_epochs; resumed with a larger max_epochs and SIGTERMed; resumed with a max_steps that
    stops mid-epoch (last.ckpt then comes from ModelCheckpoint.on_train_end); resumed with a larger max_steps.
    The same rows, read from the batches, in the same steps as one straight fit, and its very weights (dropout
    on, different on each process; constant LR). The step reached is what each checkpoint records."""
    if processes == 1:
        chains = [resume_chain(write_data(tmp_path / "data"), bpe_tokenizer_path, batch_size=4, devices=1)]
    else:  # batch 2 on each of 2 processes: the same global batch of 4
        chains = [rank["chain"] for rank in two_process_steps]
    for chain in chains:
        steps = chain["steps_per_epoch"]
        assert [chain[n]["code"] for n in CUTS] == [0, 143, 0, 0]
        assert [chain[n]["step"] for n in CUTS] == [steps, steps + 2, 2 * steps - 1, 2 * steps]
        straight = chain["straight"]
        assert [seen for n in CUTS for seen in chain[n]["samples"]] == straight["samples"]
        assert len({row for _, rows in straight["samples"] for row in rows}) >= 4 * steps - 3  # every row
        got = chain["steps"]["weights"]
        diffs = {k: (v - got[k]).abs().max().item() for k, v in straight["weights"].items()}
        assert max(diffs.values()) < 1e-6, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    if processes == 2:  # each process trained its own rows
        assert (
            two_process_steps[0]["chain"]["straight"]["samples"]
            != two_process_steps[1]["chain"]["straight"]["samples"]
        )


def test_a_stop_inside_an_accumulation_window_resumes_from_the_step_reached(tmp_path, bpe_tokenizer_path):
    """What Lightning's Timer (max_time) does: ``should_stop`` after a micro-batch that is not a step's last.
    The checkpoint written at the end of the fit records the step reached, with that step's random state;
    the resumed fit trains the interrupted step again, whole (dropout on)."""
    from steps_matrix import Samples, data_module, module, trainer

    folder = write_data(tmp_path / "data")

    class StopAfter(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 4:  # the first micro-batch of step 2
                trainer.should_stop = True

    def fit(name, *extra, ckpt_path=None):
        L.seed_everything(0)
        samples = Samples()
        saver = ModelCheckpoint(dirpath=tmp_path / name, save_top_k=0, save_last=True)
        run = trainer(tmp_path, 1, max_steps=4, accumulate_grad_batches=2, callbacks=[samples, saver, *extra],
                      enable_checkpointing=True)  # fmt: skip
        model = module("text", dropout=True)
        run.fit(model, data_module(folder, bpe_tokenizer_path, "text", 2), ckpt_path=ckpt_path)
        return model, samples.seen

    straight, every = fit("straight")
    _, first = fit("cut", StopAfter())
    assert torch.load(tmp_path / "cut" / "last.ckpt", weights_only=True)["global_step"] == 2
    resumed, rest = fit("cut", ckpt_path=tmp_path / "cut" / "last.ckpt")
    assert first[:4] + rest == every  # micro-batch 4 is trained again, in its whole step
    diffs = [
        (a - b).abs().max().item() for a, b in zip(straight.parameters(), resumed.parameters(), strict=True)
    ]
    assert max(diffs) < 1e-6


def test_last_checkpoint_is_at_the_step_reached_after_an_earlier_one(tmp_path, bpe_tokenizer_path):
    """ModelCheckpoint writes last.ckpt at the end of a fit only if it wrote none during the fit."""
    from steps_matrix import data_module, module, trainer

    folder = write_data(tmp_path / "data")
    saver = ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=0, save_last=True, every_n_train_steps=2)
    run = trainer(
        tmp_path, 1, max_steps=3, callbacks=[saver, CheckpointOnInterrupt()], enable_checkpointing=True
    )
    run.fit(module("text"), data_module(folder, bpe_tokenizer_path, "text", 4))
    assert torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)["global_step"] == 3  # not 2


def test_a_longer_schedule_is_planned_again_from_the_step_reached(tmp_path, bpe_tokenizer_path):
    from steps_matrix import data_module, module, trainer

    folder = write_data(tmp_path / "data")

    class LearningRates(L.Callback):
        def __init__(self):
            self.used = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.used.append(optimizer.param_groups[0]["lr"])

    def fit(max_steps, ckpt_path=None):
        L.seed_everything(0)
        rates = LearningRates()
        saver = ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=0, save_last=True)
        run = trainer(tmp_path, 1, max_steps=max_steps, callbacks=[rates, saver], enable_checkpointing=True)
        run.fit(
            module("text", lr_scheduler="linear"),
            data_module(folder, bpe_tokenizer_path, "text", 4),
            ckpt_path=ckpt_path,
        )
        return rates.used

    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("lightning.pytorch").addHandler(handler)  # where rank_zero_info writes
    try:
        assert fit(2) == pytest.approx([1e-2, 5e-3])  # linear decay over 2 steps: 0 after the last one
        assert fit(4, tmp_path / "ck" / "last.ckpt") == pytest.approx([5e-3, 2.5e-3])  # over 4, from step 2
    finally:
        logging.getLogger("lightning.pytorch").removeHandler(handler)
    said = [m for m in said if "learning-rate schedule" in m]
    assert said == [
        "Resuming with a learning-rate schedule over 4 optimizer steps (it was planned over 2): planned "
        "again from step 2, where its learning rate is 0.005."
    ]


def test_atomic_save_leaves_the_previous_checkpoint_whole_when_it_fails(tmp_path, monkeypatch):
    path = tmp_path / "ckpts" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def crash_midway(obj, file, *args, **kwargs):
        Path(file).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_module.torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left behind


# ----------------------------------------------------------------------------- non-finite loss
def _poison_fit(tmp_path, tokenizer_path, texts, action, poison=None, callbacks=(), accumulate=1):
    """``poison``: (optimizer step, micro-batch, process or None) whose loss is NaN (``PoisonedModule``)."""
    dsd = DatasetDict({"train": Dataset.from_dict({"text": texts[:200]})})
    dm = CausalLMDataModule(
        tokenizer=tokenizer_path, dataset=dsd, block_size=32, batch_size=4, cache_dir=str(tmp_path / "c")
    )
    L.seed_everything(0)
    module = PoisonedModule(
        model_config={"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 32},
        learning_rate=1e-3,
        on_nonfinite_loss=action,
    )
    module.poison = poison
    trainer = quiet_trainer(
        tmp_path, max_steps=4, limit_val_batches=0, enable_checkpointing=True, callbacks=list(callbacks),
        accumulate_grad_batches=accumulate,
    )  # fmt: skip
    return trainer, module, dm


class _Interrupt(L.Callback):
    """Sends this process ``signals`` in the middle of the optimizer step after step 1."""

    def __init__(self, *signals: int) -> None:
        self.signals = signals

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 1:
            for signum in self.signals:
                os.kill(os.getpid(), signum)


@pytest.fixture
def sigint_handled():
    """SIGINT raising KeyboardInterrupt, as in a foreground Python: a shell starts background jobs with SIGINT
    ignored, and CheckpointOnInterrupt leaves an ignored signal ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(
    ("signals", "code", "saved_step"),
    [((signal.SIGINT,), 130, 2), ((signal.SIGUSR1,), 138, 2), ((signal.SIGINT, signal.SIGINT), 1, None)],
    ids=["ctrl-c", "sigusr1", "ctrl-c twice"],
)
def test_a_signal_checkpoints_the_step_and_exits_non_zero(
    tmp_path, bpe_tokenizer_path, doc_texts, signals, code, saved_step, sigint_handled
):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True, save_top_k=0)
    callbacks = [checkpoints, CheckpointOnInterrupt(), _Interrupt(*signals)]
    trainer, module, dm = _poison_fit(tmp_path, bpe_tokenizer_path, doc_texts, "raise", None, callbacks)
    with pytest.raises(SystemExit) as exit_info:
        trainer.fit(module, dm)
    assert exit_info.value.code == code
    last = tmp_path / "ckpts" / "last.ckpt"
    if saved_step is None:  # a second signal stops at once: nothing half-written
        assert not last.exists() and not list((tmp_path / "ckpts").glob(".*"))
    else:
        assert torch.load(last, weights_only=True)["global_step"] == saved_step  # the step was finished
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_lightnings_slurm_requeue_handler_keeps_sigusr1():
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)  # what Lightning installs under SLURM
    try:
        assert signal.SIGUSR1 not in CheckpointOnInterrupt._signals()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert signal.SIGUSR1 in CheckpointOnInterrupt._signals()


@pytest.mark.parametrize("micro", [0, 1], ids=["first micro-batch", "last micro-batch"])
def test_nonfinite_loss_stops_before_the_step_naming_it_and_the_last_checkpoint(
    tmp_path, bpe_tokenizer_path, doc_texts, micro
):
    every_step = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=1, save_top_k=-1)
    snapshots = Snapshots()
    trainer, module, dm = _poison_fit(
        tmp_path, bpe_tokenizer_path, doc_texts, "raise", (2, micro, None), [every_step, snapshots], 2
    )
    with pytest.raises(NonFiniteLossError) as err:
        trainer.fit(module, dm)
    message = str(err.value)
    assert "The training loss is nan at step 2 (epoch 0, batches 4-5)" in message  # decided once, the step
    assert "last good checkpoint is" in message and "step=2.ckpt" in message
    assert "--model.on_nonfinite_loss skip" in message
    before = snapshots.at[2]["weights"]  # stopped before the update: the weights of the step's start
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


@pytest.mark.parametrize("micro", [0, 1], ids=["first micro-batch", "last micro-batch"])
def test_nonfinite_loss_skip_drops_the_whole_step(
    tmp_path, bpe_tokenizer_path, doc_texts, two_process_steps, micro
):
    snapshots = Snapshots()
    poison = (2, micro, None)
    trainer, module, dm = _poison_fit(tmp_path, bpe_tokenizer_path, doc_texts, "skip", poison, [snapshots], 2)
    trainer.fit(module, dm)
    assert trainer.global_step == 4  # training went on
    at = snapshots.at
    assert all(torch.equal(a, b) for a, b in zip(at[2]["weights"], at[3]["weights"], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(at[2]["moments"], at[3]["moments"], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(at[1]["weights"], at[2]["weights"], strict=True))
    state = trainer.optimizers[0].state
    assert {int(s["step"]) for s in state.values()} == {3}  # AdamW stepped 3 times, not 4
    assert all(torch.isfinite(p).all() for p in module.parameters())
    # 2 processes, a NaN in the first micro-batch of step 1 on process 1 only: both skip the step.
    for rank in two_process_steps:
        assert all(torch.equal(a, b) for a, b in zip(*rank["weights"], strict=True))


def test_cli_clips_gradients_at_one_by_default(tmp_path, bpe_tokenizer_path):
    from lm_lightning.cli import cli_main

    norms = GradNorms()
    # Large initial weights: gradient norms well above 1, so that clipping has something to do.
    args = ["--model.model_config", "{n_layer: 1, n_embd: 32, n_head: 2, initializer_range: 0.5}",
            "--data.corpus", "python-docs",
            "--data.tokenizer", bpe_tokenizer_path, "--data.block_size", "32", "--data.cache_dir",
            str(tmp_path / "cache"), "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
            "--trainer.logger", "false",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", "cpu"]  # fmt: skip
    cli = cli_main(args, run=False)
    cli.trainer.callbacks.append(norms)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert len(norms.after) == 3 and min(norms.before) > 1.0  # clipping had something to do
    assert max(norms.after) == pytest.approx(1.0, rel=1e-4)


def test_last_and_best_are_found_in_earlier_versions(tmp_path):
    from lm_lightning.errors import RunError
    from lm_lightning.model.checkpointing import resolve_best, resolve_last

    root = tmp_path / "runs" / "tiny"
    best = root / "version_0" / "checkpoints" / "epoch0-step4-ppl9.00.ckpt"
    best.parent.mkdir(parents=True)
    best.write_bytes(b"")
    key = "ModelCheckpoint{'monitor': 'val/perplexity', 'mode': 'min', 'every_n_train_steps': 0}"
    old = root / "version_0" / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {}, "callbacks": {key: {"best_model_path": str(best)}}}, old)
    new = root / "version_1" / "checkpoints" / "last.ckpt"
    new.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "callbacks": {}}, new)
    os.utime(old, (1, 1))  # version_1's is the newer one
    assert resolve_last([root], "validate") == new
    with pytest.raises(RunError, match="records no existing best checkpoint on 'val/perplexity'"):
        resolve_best(new, "val/perplexity")
    os.utime(new, (0, 0))
    assert resolve_best(resolve_last([root], "test"), "val/perplexity") == best
    assert resolve_last([tmp_path / "elsewhere"], "fit") is None  # fit starts anew
    with pytest.raises(RunError, match="--ckpt_path last: no last"):
        resolve_last([tmp_path / "elsewhere"], "validate")
