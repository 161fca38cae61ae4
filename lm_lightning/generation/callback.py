"""TextGenerationCallback: continuations of fixed prompts during training, to the console, loggers, a file."""

from __future__ import annotations

import html
import json
import textwrap
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from transformers import PreTrainedTokenizerBase

from lm_lightning.data.tokenizer import find_tokenizer
from lm_lightning.generation.decoding import DecodingConfig, GeneratedText, generate_texts, resolve_decodings
from lm_lightning.model.parallel import check_whole_parameters

_COLUMNS = ["epoch", "step", "preset", "index", "prompt", "text", "num_new_tokens"]


class TextGenerationCallback(L.Callback):
    """Continues fixed prompts with each decoding setting at the end of every validation, or every N steps.

    The samples go to the console (each on its own lines), to TensorBoard as text, to any other logger with a
    ``log_text`` method (Weights & Biases), and to ``jsonl_name`` in the run's log folder, one JSON line per
    continuation. The LightningModule must expose the Hugging Face model as ``model`` and the tokenizer as
    ``tokenizer`` (or the datamodule as ``tokenizer``), so it also works with a plain ``lightning.Trainer`` in
    a notebook. Only the global-zero process generates; the others do nothing, so no process waits for
    another. For that reason parameters sharded across processes (FSDP, DeepSpeed ZeRO-3) are refused at
    setup.
    """

    def __init__(
        self,
        prompts: list[str],
        decodings: list[str | DecodingConfig | dict[str, Any]] | str | None = None,
        every_n_steps: int | None = None,
        max_new_tokens: int | None = None,
        jsonl_name: str = "samples.jsonl",
        batch_size: int = 8,
    ) -> None:
        """
        Args:
            prompts: The texts to continue.
            decodings: Preset names (see ``lm_lightning.generation.decoding.PRESETS``), decoding settings,
                or mappings of a ``preset`` and the settings that override it; default
                ``["greedy", "top_k_top_p"]``.
            every_n_steps: Generate every this many optimizer steps instead of at each validation end.
            max_new_tokens: Overrides the length of every decoding setting.
            jsonl_name: Name of the JSONL file of samples in the run's log folder.
            batch_size: Prompts per ``generate`` call.
        """
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise ValueError(f"prompts={prompts!r} is invalid: give a non-empty list of non-empty strings.")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(
                f"every_n_steps={every_n_steps} is invalid: give an integer >= 1, or None to generate at "
                "the end of each validation."
            )
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is invalid: it must be >= 1.")
        self.prompts = list(prompts)
        self.decodings = resolve_decodings(
            ["greedy", "top_k_top_p"] if decodings is None else decodings, max_new_tokens
        )
        self.every_n_steps = every_n_steps
        self.jsonl_name = jsonl_name
        self.batch_size = batch_size
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_whole_parameters(trainer, "TextGenerationCallback generates")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_steps is None and not trainer.sanity_checking:
            self.sample(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # With gradient accumulation several batches end on the same optimizer step: generate once.
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.sample(trainer, pl_module)

    def sample(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[GeneratedText]:
        """The continuations, generated now, shown, logged and written; on processes but global zero, none."""
        if not trainer.is_global_zero:
            return []
        model, tokenizer = _model_and_tokenizer(trainer, pl_module)
        samples = [
            sample
            for name, decoding in self.decodings
            for sample in generate_texts(model, tokenizer, self.prompts, decoding, name, self.batch_size)
        ]
        rows = [[trainer.current_epoch, trainer.global_step, *_row(sample)] for sample in samples]
        _print_samples(
            trainer, rows, title=f"Samples at epoch {trainer.current_epoch}, step {trainer.global_step}"
        )
        self._log(trainer, samples)
        self._append_jsonl(trainer, rows)
        return samples

    def _log(self, trainer: L.Trainer, samples: list[GeneratedText]) -> None:
        step = trainer.global_step
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for name, _ in self.decodings:
                    text = _markdown_table([s for s in samples if s.preset == name])
                    logger.experiment.add_text(f"samples/{name}", text, global_step=step)
            elif hasattr(logger, "log_text"):
                data = [[trainer.current_epoch, step, *_row(sample)] for sample in samples]
                logger.log_text(key="samples", columns=_COLUMNS, data=data, step=step)

    def _append_jsonl(self, trainer: L.Trainer, rows: list[list[Any]]) -> None:
        path = _log_dir(trainer) / self.jsonl_name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as file:
            for row in rows:
                # Whole lines, flushed: a reader tailing the file never sees half a record.
                file.write(json.dumps(dict(zip(_COLUMNS, row, strict=True)), ensure_ascii=False) + "\n")
                file.flush()


def _row(sample: GeneratedText) -> list[Any]:
    return [sample.preset, sample.index, sample.prompt, sample.text, sample.num_new_tokens]


def _model_and_tokenizer(
    trainer: L.Trainer, pl_module: L.LightningModule
) -> tuple[Any, PreTrainedTokenizerBase]:
    """The Hugging Face model of the LightningModule and the tokenizer of the module or the datamodule."""
    model = getattr(pl_module, "model", None)
    if model is None or not callable(getattr(model, "generate", None)):
        raise AttributeError(
            f"TextGenerationCallback needs the LightningModule to hold a Hugging Face causal LM as `.model`; "
            f"{type(pl_module).__name__}.model is {type(model).__name__}."
        )
    tokenizer = find_tokenizer(pl_module, trainer)
    if tokenizer is None:
        raise AttributeError(
            f"TextGenerationCallback needs a tokenizer: set `.tokenizer` on {type(pl_module).__name__} or on "
            "the datamodule given to the Trainer."
        )
    return model, tokenizer


def _log_dir(trainer: L.Trainer) -> Path:
    """Where ``trainer.log_dir`` points, read on this process alone.

    ``trainer.log_dir`` broadcasts from rank zero, a collective that would hang when only rank zero calls it.
    """
    if trainer.loggers:
        logger = trainer.loggers[0]
        directory = logger.log_dir if isinstance(logger, (TensorBoardLogger, CSVLogger)) else logger.save_dir
        if directory is not None:
            return Path(directory)
    return Path(trainer.default_root_dir)


def _markdown_table(samples: list[GeneratedText]) -> str:
    def cell(text: str) -> str:
        return html.escape(text).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| prompt | # | continuation |", "|---|---|---|"]
    lines += [f"| {cell(s.prompt)} | {s.index} | {cell(s.text)} |" for s in samples]
    return "\n".join(lines)


def format_samples(rows: list[list[Any]], title: str, width: int = 100) -> str:
    """The samples as text: a title line, then each sample on its own lines (no table to wrap).

    ``[greedy #0, 30 new tokens]``, then the prompt and its continuation as one text (the model continues the
    prompt's string), indented, its line breaks kept and long lines wrapped at ``width``.
    """
    lines = [f"{title}:"]
    for _, _, preset, index, prompt, text, num_new_tokens in rows:
        lines.append(f"  [{preset} #{index}, {num_new_tokens} new tokens]")
        body = (prompt + text).strip() or "(nothing but white space)"
        for paragraph in body.split("\n"):
            if paragraph.strip():
                lines += textwrap.wrap(
                    paragraph.strip(), width, initial_indent="      ", subsequent_indent="      "
                )
    return "\n".join(lines)


def _print_samples(trainer: L.Trainer, rows: list[list[Any]], title: str) -> None:
    """Above the progress bars (through them, a print would leave half a bar on screen)."""
    text = format_samples(rows, title)
    bar = next((c for c in trainer.callbacks if isinstance(c, TQDMProgressBar) and c.is_enabled), None)
    if bar is not None:
        bar.print(text)
    else:
        print(text, flush=True)
