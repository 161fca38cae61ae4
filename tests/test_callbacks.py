"""TextGenerationCallback with a real Trainer on a tiny model, and on a process other than global zero."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import Mock

import lightning as L
import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from lm_lightning.generation import callback as callbacks
from lm_lightning.generation.callback import TextGenerationCallback, _model_and_tokenizer
from lm_lightning.generation.decoding import PRESETS, DecodingConfig
from lm_lightning.model.sharded import FSDP2Strategy

PROMPTS = ["The", "def f(x): return"]
KEYS = {"epoch", "step", "prompt", "preset", "index", "text", "num_new_tokens"}


class TinyLM(L.LightningModule):
    """A LightningModule exposing ``model`` (and ``tokenizer``), recording the mode of each training step."""

    def __init__(self, model, tokenizer=None):
        super().__init__()
        # Lightning 2.6 keeps each module's mode at fit start, and the fixture's model is in eval mode.
        self.model = model.train()
        if tokenizer is not None:
            self.tokenizer = tokenizer
        self.training_modes: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.training_modes.append(self.model.training)
        return self.model(input_ids=batch, labels=batch).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(input_ids=batch, labels=batch).loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class GenerateSpy:
    """Wraps ``model.generate`` to count calls and record the grad and train modes they ran in."""

    def __init__(self, model):
        self.model, self.generate, self.modes = model, model.generate, []
        model.generate = self

    def __call__(self, *args, **kwargs):
        self.modes.append((self.model.training, torch.is_grad_enabled()))
        return self.generate(*args, **kwargs)


class TextLogger(Logger):
    """A logger with ``log_text`` (like WandbLogger), recording its calls."""

    def __init__(self):
        super().__init__()
        self.texts: list[tuple] = []

    name = "text"
    version = 0

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_text(self, key, columns=None, data=None, step=None):
        self.texts.append((key, columns, data, step))


def blocks(vocab_size: int, n: int = 8, length: int = 16) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    return DataLoader(torch.randint(1, vocab_size, (n, length), generator=generator), batch_size=4)


def trainer(tmp_path, callback, **kwargs) -> L.Trainer:
    settings = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 2,
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "logger": TensorBoardLogger(tmp_path, name="run"),
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
        "default_root_dir": tmp_path,
    }
    return L.Trainer(callbacks=[callback], **{**settings, **kwargs})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_samples_each_validation_for_each_preset(tmp_path, tiny_gpt2, bpe_tokenizer, capsys):
    callback = TextGenerationCallback(PROMPTS, max_new_tokens=6)
    module, spy = TinyLM(tiny_gpt2, bpe_tokenizer), GenerateSpy(tiny_gpt2)
    fit = trainer(tmp_path, callback)  # with the default sanity check, which must not sample
    fit.fit(module, blocks(len(bpe_tokenizer)), blocks(len(bpe_tokenizer)))

    log_dir = Path(fit.logger.log_dir)
    lines = read_jsonl(log_dir / "samples.jsonl")
    assert all(set(line) == KEYS for line in lines)
    per_prompt = {"greedy": 1, "top_k_top_p": PRESETS["top_k_top_p"].num_return_sequences}
    expected = {(epoch, name): n * len(PROMPTS) for epoch in (0, 1) for name, n in per_prompt.items()}
    assert Counter((line["epoch"], line["preset"]) for line in lines) == expected
    assert {(line["epoch"], line["step"]) for line in lines} == {(0, 2), (1, 4)}
    assert [(line["prompt"], line["index"]) for line in lines[:8]] == [
        (PROMPTS[0], 0),
        (PROMPTS[1], 0),
        *[(prompt, i) for prompt in PROMPTS for i in range(3)],
    ]
    assert all(1 <= line["num_new_tokens"] <= 6 and isinstance(line["text"], str) for line in lines)
    # One call per decoding and validation, in eval mode without gradients; training went on in train mode.
    assert spy.modes == [(False, False)] * 4
    assert module.training_modes == [True] * 4

    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    events.Reload()
    text_tags = {tag for tag in events.Tags()["tensors"] if tag.startswith("samples/")}
    assert text_tags == {"samples/greedy/text_summary", "samples/top_k_top_p/text_summary"}
    greedy = events.Tensors("samples/greedy/text_summary")
    assert [event.step for event in greedy] == [2, 4]
    assert "def f(x): return" in greedy[0].tensor_proto.string_val[0].decode()

    out = capsys.readouterr().out
    assert "Samples at epoch 0, step 2" in out and "Samples at epoch 1, step 4" in out
    assert "top_k_top_p" in out


def test_every_n_steps_samples_once_per_optimizer_step_and_keeps_train_mode(
    tmp_path, tiny_gpt2, bpe_tokenizer
):
    callback = TextGenerationCallback(["The"], decodings="greedy", every_n_steps=1, max_new_tokens=4)
    module, spy = TinyLM(tiny_gpt2, bpe_tokenizer), GenerateSpy(tiny_gpt2)
    fit = trainer(
        tmp_path, callback, max_epochs=1, limit_train_batches=4, accumulate_grad_batches=2, logger=False
    )
    fit.fit(module, blocks(len(bpe_tokenizer), n=16))

    # Without a logger the file goes to default_root_dir.
    lines = read_jsonl(tmp_path / "samples.jsonl")
    assert [(line["step"], line["preset"]) for line in lines] == [(1, "greedy"), (2, "greedy")]
    assert spy.modes == [(False, False)] * 2
    assert module.training_modes == [True] * 4
    assert tiny_gpt2.training


def test_global_zero_calls_no_collective(tmp_path, tiny_gpt2, bpe_tokenizer, monkeypatch):
    """On rank zero alone, a broadcast or barrier would wait forever for the other ranks."""
    callback = TextGenerationCallback(PROMPTS, decodings="greedy", max_new_tokens=3)
    fit = trainer(tmp_path, callback, logger=[TextLogger(), TensorBoardLogger(tmp_path, name="run")])
    module = TinyLM(tiny_gpt2, bpe_tokenizer)

    def collective(*args, **kwargs):
        raise AssertionError("collective call on rank zero alone")

    for name in ("broadcast", "barrier", "reduce", "all_gather", "reduce_boolean_decision"):
        monkeypatch.setattr(fit.strategy, name, collective)
    with pytest.raises(AssertionError, match="collective"):
        fit.log_dir  # noqa: B018 -- the trap: Trainer.log_dir broadcasts

    callback.on_validation_epoch_end(fit, module)
    # The first logger has no save_dir, so the file goes to default_root_dir, as Trainer.log_dir would say.
    lines = read_jsonl(tmp_path / "samples.jsonl")
    assert [line["prompt"] for line in lines] == PROMPTS
    [(key, columns, data, step)] = fit.loggers[0].texts
    assert (key, step) == ("samples", 0)
    assert columns == ["epoch", "step", "preset", "index", "prompt", "text", "num_new_tokens"]
    assert [dict(zip(columns, row, strict=True)) for row in data] == lines


def test_other_ranks_write_nothing_and_call_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(
        callbacks, "generate_texts", Mock(side_effect=AssertionError("generated off rank zero"))
    )
    trainer = Mock(is_global_zero=False, sanity_checking=False, global_step=4, default_root_dir=str(tmp_path))
    module = Mock()
    at_validation = TextGenerationCallback(PROMPTS)
    every_step = TextGenerationCallback(PROMPTS, every_n_steps=1)

    at_validation.on_validation_epoch_end(trainer, module)
    every_step.on_train_batch_end(trainer, module, None, None, 0)
    assert at_validation.sample(trainer, module) == []
    assert trainer.mock_calls == [] and module.mock_calls == []
    assert list(tmp_path.iterdir()) == []


def test_model_and_tokenizer_lookup(tiny_gpt2, bpe_tokenizer):
    with_tokenizer = SimpleNamespace(model=tiny_gpt2, tokenizer=bpe_tokenizer)
    assert _model_and_tokenizer(SimpleNamespace(datamodule=None), with_tokenizer) == (
        tiny_gpt2,
        bpe_tokenizer,
    )
    from_datamodule = SimpleNamespace(datamodule=SimpleNamespace(tokenizer=bpe_tokenizer))
    assert _model_and_tokenizer(from_datamodule, SimpleNamespace(model=tiny_gpt2)) == (
        tiny_gpt2,
        bpe_tokenizer,
    )

    with pytest.raises(AttributeError, match="needs a tokenizer"):
        _model_and_tokenizer(SimpleNamespace(datamodule=None), SimpleNamespace(model=tiny_gpt2))
    with pytest.raises(AttributeError, match=r"causal LM as `.model`; SimpleNamespace.model is NoneType"):
        _model_and_tokenizer(from_datamodule, SimpleNamespace(tokenizer=bpe_tokenizer))
    with pytest.raises(AttributeError, match=r"SimpleNamespace.model is Linear"):
        _model_and_tokenizer(from_datamodule, SimpleNamespace(model=torch.nn.Linear(2, 2)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompts": []}, r"prompts=\[\] is invalid"),
        ({"prompts": "The"}, "prompts='The' is invalid"),
        ({"prompts": ["The", ""]}, "non-empty strings"),
        ({"every_n_steps": 0}, "every_n_steps=0 is invalid"),
        ({"max_new_tokens": 0}, "max_new_tokens=0 is invalid"),
        ({"decodings": ["greedy", "nucleus"]}, "decoding='nucleus' is not a preset: choose one of"),
        ({"decodings": []}, r"decodings=\[\] is invalid"),
        ({"batch_size": 0}, "batch_size=0 is invalid"),
    ],
)
def test_invalid_arguments_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TextGenerationCallback(**{"prompts": PROMPTS, **kwargs})


def test_decodings_are_named_uniquely_and_max_new_tokens_overrides_all():
    callback = TextGenerationCallback(
        PROMPTS,
        decodings=["beam", DecodingConfig(max_length=30), DecodingConfig(num_beams=2), {"preset": "greedy"}],
        max_new_tokens=7,
    )
    assert [name for name, _ in callback.decodings] == ["beam", "custom", "custom_1", "greedy"]
    assert {(d.max_new_tokens, d.max_length) for _, d in callback.decodings} == {(7, None)}
    assert callback.decodings[0][1].num_beams == 5
    assert [name for name, _ in TextGenerationCallback(PROMPTS).decodings] == ["greedy", "top_k_top_p"]


def test_sharded_strategies_are_refused_at_setup():
    callback = TextGenerationCallback(PROMPTS)
    with pytest.raises(ValueError, match="parameters FSDPStrategy shards across 2 processes"):
        callback.setup(SimpleNamespace(strategy=FSDPStrategy(), world_size=2), Mock(), "fit")
    callback.setup(SimpleNamespace(strategy=FSDPStrategy(), world_size=1), Mock(), "fit")
    callback.setup(SimpleNamespace(strategy=SingleDeviceStrategy(), world_size=2), Mock(), "fit")
    with pytest.raises(ValueError, match="parameters FSDP2Strategy shards across 2 processes"):
        callback.setup(SimpleNamespace(strategy=FSDP2Strategy(), world_size=2), Mock(), "fit")


def test_parses_from_yaml_as_the_cli_would(tmp_path):
    config = tmp_path / "callback.yaml"
    config.write_text(
        "prompts: [The, 'def f(x):']\n"
        "decodings:\n"
        "- greedy\n"
        "- {preset: top_k, temperature: 0.5}\n"
        "- {do_sample: true, top_p: 0.9}\n"
        "max_new_tokens: 12\n"
    )
    parser = ArgumentParser()
    parser.add_class_arguments(TextGenerationCallback, "callback")
    callback = parser.instantiate(parser.parse_args([f"--callback={config}"])).callback
    assert [name for name, _ in callback.decodings] == ["greedy", "top_k(temperature=0.5)", "custom"]
    assert callback.decodings[1][1] == DecodingConfig(
        do_sample=True, top_k=50, temperature=0.5, max_new_tokens=12
    )
    assert callback.decodings[2][1] == DecodingConfig(do_sample=True, top_p=0.9, max_new_tokens=12)


def test_tokens_per_second_count_real_tokens_only(monkeypatch):
    """Unpacked fine-tuning batches are half padding: the bar, the line after each validation and the
    throughput monitor count the tokens that are not (from the collator's count: no device sync)."""
    from lm_lightning.data.examples import BlockCollator, PadCollator, real_tokens
    from lm_lightning.model.flops import _num_tokens
    from lm_lightning.progress import TokensPerSecondProgressBar, ValidationSummary

    rows = [{"input_ids": torch.arange(n), "labels": torch.arange(n)} for n in (10, 3, 1)]
    padded = PadCollator(0)(rows)  # 3 rows of 10: 14 real tokens
    block = {"input_ids": torch.arange(8)}
    with_padding_block = BlockCollator()(
        [{**block, "labels": torch.arange(8)}, {**block, "labels": torch.full((8,), -100)}]
    )
    assert real_tokens(padded) == _num_tokens(padded) == 14 and padded["input_ids"].numel() == 30
    assert real_tokens(with_padding_block) == 8  # the padding block (labels -100) is not counted
    assert real_tokens({"input_ids": torch.zeros(2, 5)}) == 10  # a batch of some other collator: all of it

    trainer = SimpleNamespace(
        world_size=2,
        sanity_checking=False,
        state=SimpleNamespace(fn="fit"),
        callbacks=[],
        current_epoch=0,
        callback_metrics={"val/perplexity": torch.tensor(5.0)},
    )
    summary = ValidationSummary()
    summary.on_train_epoch_start(trainer, None)
    for _ in range(3):
        summary.on_train_batch_start(trainer, None, padded, 0)
        summary.on_train_batch_end(trainer, None, None, padded, 0)
    assert summary._tokens == 3 * 14 * 2  # over both processes
    messages = []
    monkeypatch.setattr("lm_lightning.progress.rank_zero_info", messages.append)
    summary.on_validation_end(trainer, None)
    assert messages[0].endswith(" real tok/s")

    bar = TokensPerSecondProgressBar()
    monkeypatch.setattr(L.pytorch.callbacks.TQDMProgressBar, "on_train_batch_end", lambda *args: None)
    clock = iter([0.0, 1.0])
    monkeypatch.setattr("lm_lightning.progress.time.perf_counter", lambda: next(clock))
    for _ in range(2):
        bar.on_train_batch_end(trainer, None, None, padded, 0)
    assert bar._rate == 14 * 2  # real tokens per second, over both processes
    monkeypatch.setattr(L.pytorch.callbacks.TQDMProgressBar, "get_metrics", lambda *args: {})
    assert bar.get_metrics(trainer, None) == {"real tok/s": "28"}


def test_printed_samples_read_as_the_prompt_continued_in_wrapped_lines():
    from lm_lightning.generation.callback import format_samples

    long = " and then" * 30
    rows = [
        [0, 2, "greedy", 0, "The for statement", " is used to loop.\n\nIt ends" + long, 42],
        [0, 2, "beam", 1, "A", "   ", 3],
    ]
    lines = format_samples(rows, "Samples at epoch 0, step 2").split("\n")
    assert lines[0] == "Samples at epoch 0, step 2:"
    assert lines[1] == "  [greedy #0, 42 new tokens]"
    assert lines[2] == "      The for statement is used to loop."  # the prompt continued, not cut from it
    assert lines[3].startswith("      It ends and then")  # the blank line dropped, the break kept
    assert len(lines) > 5 and all(len(line) <= 100 for line in lines)  # wrapped, none over the width
    assert lines[-2:] == ["  [beam #1, 3 new tokens]", "      A"]
