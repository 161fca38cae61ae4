"""Train and fine-tune causal language models with PyTorch Lightning: LightningCLI over our module and data.

``python -m lm_lightning {fit,validate,test,predict,export,report}``.
"""

from __future__ import annotations

import copy
import sys
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, RichModelSummary
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from lm_lightning.console import (
    VERBOSE_ENV,
    ModelOnlySummary,
    RunBanner,
    closing_lines,
    is_verbose,
    quiet_libraries,
)
from lm_lightning.curves import CurvesCallback
from lm_lightning.data.datamodule import CausalLMDataModule
from lm_lightning.data.formats import chat_template_of
from lm_lightning.errors import (
    RunError,
    check_compatible,
    check_precision,
    check_schedule_length,
    check_trained,
    is_open_ended,
    is_user_error,
    report_and_exit,
)
from lm_lightning.generation.callback import TextGenerationCallback
from lm_lightning.generation.writer import JSONLPredictionWriter
from lm_lightning.model.boundaries import check_step_boundaries
from lm_lightning.model.checkpointing import (
    AtomicCheckpointIO,
    check_checkpoint,
    completed_epochs,
    resolve_best,
    resolve_last,
)
from lm_lightning.model.export import check_export_dir, check_export_owner
from lm_lightning.model.faults import NonFiniteLossError
from lm_lightning.model.interrupts import CheckpointOnInterrupt
from lm_lightning.model.lora import check_qlora
from lm_lightning.model.module import CausalLMModule, export_checkpoint
from lm_lightning.parsing import CLIParser, ExportParser, parsed_argv, remember_argv
from lm_lightning.precision import default_precision, precision_reason
from lm_lightning.progress import TokensPerSecondProgressBar, ValidationSummary

# Module arguments that decide the shape of the weights: a checkpoint's values win over the config's.
WEIGHT_DEFINING_KEYS = ("model_name_or_path", "config_name", "model_config", "tokenizer", "lora")


class CausalLMCLI(LightningCLI):
    """LightningCLI with the tokenizer linked from data to model, and two checkpoints.

    ``checkpoint`` keeps the best ``val/perplexity`` and writes ``last.ckpt`` after each validation;
    ``last_checkpoint`` also writes ``last.ckpt`` every ``every_n_train_steps`` optimizer steps, for exact
    resume with ``--ckpt_path last``. That finds the newest ``last.ckpt`` of the logger's earlier versions and
    goes on logging into that version.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's, less ``Trainer.validate``/``test``'s own ``verbose``: ``--verbose`` is ours."""
        return {name: {*skip, "verbose"} for name, skip in LightningCLI.subcommands().items()}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.tokenizer", "model.tokenizer")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.add_lightning_class_args(JSONLPredictionWriter, "predictions")
        parser.add_argument(
            "--verbose",
            type=bool,
            default=False,
            help="Show Lightning's own lines (devices, model summary, tips) and the known library warnings; "
            f"also {VERBOSE_ENV}=1.",
        )
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/perplexity",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,  # after each validation
                "checkpoint.filename": "epoch{epoch}-step{step}-ppl{val/perplexity:.2f}",
                "checkpoint.auto_insert_metric_name": False,
                # Both write the same last.ckpt, whichever is newer (no last-v1.ckpt beside it).
                "checkpoint.enable_version_counter": False,
                "last_checkpoint.save_top_k": 0,
                "last_checkpoint.save_last": True,
                "last_checkpoint.every_n_train_steps": 1000,
                "last_checkpoint.enable_version_counter": False,
            }
        )

    def _config(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        data, model = config.data, config.model
        if data.tokenizer is None and data.train_tokenizer_vocab_size is None and model.model_name_or_path:
            # The model's own tokenizer; both halves get it (the link ran at parse time).
            data.tokenizer = model.tokenizer = model.tokenizer or model.model_name_or_path
        # With --ckpt_path, Lightning 2.6 replaces the whole model section by the checkpoint's
        # hyperparameters, silently dropping command-line settings such as --model.predict_decodings. Only
        # what defines the weights comes from the checkpoint; everything else is what the user gave.
        subcommand = self.config.get("subcommand")
        if not subcommand or not self.config[subcommand].get("ckpt_path"):
            return
        given, merged = self._given_config[subcommand].model, self.config[subcommand].model
        for key, value in vars(given).items():
            if key not in WEIGHT_DEFINING_KEYS:
                merged[key] = value

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then check ``--ckpt_path`` (Lightning next reads the model's settings from that file)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        self.verbose = is_verbose((self.config[subcommand] if subcommand else self.config).get("verbose"))
        quiet_libraries(self.verbose)  # before the seed and the trainer log their lines
        if subcommand and self.config[subcommand].get("ckpt_path"):
            self._resolve_ckpt_path(self.config[subcommand], subcommand)
        elif subcommand in ("validate", "test") and run_root(self.config[subcommand].trainer.logger):
            # Outside weights (--model.model_name_or_path): runs/NAME/validate/version_N, not a fit version.
            init_args = self.config[subcommand].trainer.logger.init_args
            init_args.name = f"{init_args.name}/{subcommand}" if init_args.name else subcommand
        self._given_config = copy.deepcopy(self.config)  # before Lightning merges the checkpoint's settings

    def _resolve_ckpt_path(self, config: Any, subcommand: str) -> None:
        """``last``/``best`` -> a file of an earlier run (Lightning looks in the new run's folder only)."""
        ckpt_path = config.ckpt_path
        root = run_root(config.trainer.logger)
        if ckpt_path in ("last", "best"):
            dirs = [Path(d) for d in (config.last_checkpoint.dirpath, config.checkpoint.dirpath) if d]
            if not dirs and root is not None:
                dirs = [root]
            last = resolve_last(dirs, subcommand, f"--ckpt_path {ckpt_path}")
            path = last if ckpt_path == "last" else resolve_best(last, config.checkpoint.monitor)
            if path is None:
                print(f"--ckpt_path last: no checkpoint in {', '.join(map(str, dirs))}; fit starts anew.")
                config.ckpt_path = None
                return
            config.ckpt_path = ckpt_path = str(path)
        checkpoint = check_checkpoint(ckpt_path)
        path = Path(ckpt_path)
        version = path.parent.parent.name if root is not None and path.parent.parent.parent == root else None
        if version is not None and subcommand in ("fit", "predict"):
            # Write into the run the checkpoint belongs to: fit goes on in its version folder; predict writes
            # into its predict/ subfolder.
            subfolder = version if subcommand == "fit" else f"{version}/{subcommand}"
            config.trainer.logger.init_args.version = subfolder
        elif version is not None:
            # Each evaluation of the run's checkpoints in a numbered folder of its own
            # (version_0/validate/version_1), so that TensorBoard keeps them apart.
            init_args = config.trainer.logger.init_args
            init_args.name, init_args.version = f"{init_args.name}/{version}/{subcommand}", None
        if subcommand == "fit":
            self._announce_resume(config, path, checkpoint)

    @staticmethod
    def _announce_resume(config: Any, path: Path, checkpoint: dict[str, Any]) -> None:
        """One line on where fit goes on from; a finished run exits here (nothing trained or exported)."""
        step, epochs = int(checkpoint.get("global_step", 0)), completed_epochs(checkpoint)
        max_steps, max_epochs = config.trainer.max_steps, config.trainer.max_epochs
        if max_steps is not None and max_steps > 0 and step >= max_steps:
            limit = ("max_steps", max_steps)
        elif max_steps in (None, -1) and max_epochs is not None and 0 <= max_epochs <= epochs:
            limit = ("max_epochs", max_epochs)
        else:
            written = datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M:%S")
            print(f"Resuming from {path}: epoch {epochs}, step {step} (written {written}).")
            return
        name, value = limit
        print(
            f"{path}: already complete at step {step} ({name}={value}); raise --trainer.{name} to continue."
        )
        raise SystemExit(0)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        if self._config().trainer.enable_progress_bar is False:
            # The progress bar is a default callback; Lightning refuses it with enable_progress_bar=False.
            self.trainer_defaults["callbacks"] = [
                c for c in self.trainer_defaults["callbacks"] if not isinstance(c, TokensPerSecondProgressBar)
            ]
        config = self._config()
        given_logger = any(arg.startswith("--trainer.logger") for arg in parsed_argv())
        quiet_predict = self.subcommand == "predict" and config.predictions.output_path and not given_logger
        if quiet_predict:  # an explicit output file is all that predict writes (unless a logger is asked for)
            kwargs["logger"] = False
        trainer = super().instantiate_trainer(**kwargs)
        if quiet_predict:
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, SaveConfigCallback)]
        # Quiet: the run's one line says the parameters; verbose: Lightning's summary, of the model alone.
        summaries = [c for c in trainer.callbacks if type(c) in (ModelSummary, RichModelSummary)]
        trainer.callbacks = [c for c in trainer.callbacks if c not in summaries]
        if self.verbose and summaries:
            trainer.callbacks.append(ModelOnlySummary(max_depth=1))
        if self.subcommand not in (None, "fit"):
            # Evaluation writes no checkpoint; restoring the fit's checkpoint callbacks would only warn that
            # their folder "has changed", and Lightning's reminder that they are absent is moot here.
            # The config's sampling callback is the fit's: validate prints its metric, not the samples again.
            fit_only = (ModelCheckpoint, TextGenerationCallback)
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, fit_only)]
            warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`, callbacks used")
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def _check_run(self) -> None:
        # Fails before any data is tokenized or any weights are loaded (the model's config only).
        config = self._config()
        check_precision(config.trainer.precision, self.trainer.accelerator)
        for banner in (c for c in self.trainer.callbacks if isinstance(c, RunBanner)):
            banner.reason = precision_reason(config.trainer.precision)  # said on the run's one line
        if self.subcommand in ("validate", "test"):
            self.datamodule.source.check_split("test" if self.subcommand == "test" else "validation")
        if self.subcommand == "predict" and self.datamodule.prompts is None:
            raise RunError(
                "predict needs prompts: set --data.prompts '[\"Once upon a time\"]' or --data.prompts_file "
                "FILE (one prompt a line, or a .jsonl of chats)."
            )
        if self.subcommand == "predict" and not isinstance(self.datamodule.prompts[0], str):
            chat_template_of(self.datamodule.tokenizer, self.datamodule.chat_template)  # chats need one
        if self.subcommand != "fit":
            check_trained(self.subcommand, config.ckpt_path, self.model.hparams.model_name_or_path)
        if config.get("ckpt_path"):
            # The checkpoint's own config and tokenizer: no hub, tokenizer folder or base weights needed.
            self.model.use_checkpoint(config.ckpt_path)
            if self.model.tokenizer is not None:
                self.datamodule.use_tokenizer(self.model.tokenizer)
        if self.subcommand == "fit" and self.model.hparams.export_dir not in (None, True, False):
            check_export_dir(self.model.hparams.export_dir, setting="--model.export_dir")
            check_export_owner(self.model.hparams.export_dir, self.trainer.log_dir)
        check_qlora(
            self.model.lora, self.trainer.strategy.root_device.type, not self.model.hparams.model_name_or_path
        )
        tokenizer = self.datamodule.tokenizer
        model_config = self.model.build_config(tokenizer)
        predicting = self.subcommand == "predict"  # prompts are not cut into blocks
        check_compatible(model_config, tokenizer, None if predicting else self.datamodule.block_size)
        if self.subcommand == "fit":
            check_step_boundaries(self.trainer)  # validation on optimizer-step boundaries
            trainer, streaming = self.trainer, bool(getattr(self.datamodule, "streaming", False))
            max_time = config.trainer.get("max_time")
            open_ended = is_open_ended(trainer.max_epochs, trainer.max_steps, max_time, streaming)
            check_schedule_length(config.model.lr_scheduler, config.model.warmup_ratio, open_ended)

    before_fit = before_validate = before_test = before_predict = _check_run

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            print("\n" + "\n".join(closing_lines(self.trainer, self.model)), flush=True)  # below the bar

    def after_predict(self) -> None:
        writer = next((c for c in self.trainer.callbacks if isinstance(c, JSONLPredictionWriter)), None)
        if writer is not None and writer.written is not None:
            print(f"Wrote predictions to {writer.written}")


PROG = "python -m lm_lightning"
SUBCOMMANDS = {
    "fit": "Train the model, validating after each epoch; --ckpt_path last resumes the newest run.",
    "validate": "Validation loss and perplexity of a checkpoint (--ckpt_path) or of pretrained weights.",
    "test": "Test loss and perplexity of a checkpoint (--ckpt_path) or of pretrained weights.",
    "predict": "Continue prompts (--data.prompts or --data.prompts_file) into a JSONL file.",
    "export": "Turn a checkpoint into a Hugging Face folder: export --ckpt_path CKPT --output_dir DIR.",
    "report": "A table of a run's versions (perplexity, time, memory) and their curves: report runs/NAME.",
    "evaluate": "Benchmark tasks (lm-evaluation-harness) on a checkpoint: --ckpt_path last --tasks T.",
}
HELP = "\n".join(
    [
        f"usage: {PROG} {{{','.join(SUBCOMMANDS)}}} [--config FILE] [--section.key VALUE ...]",
        "",
        "Train and fine-tune causal language models with PyTorch Lightning.",
        "",
        "subcommands (add --help after one for all its settings):",
        *(f"  {name:<10} {text}" for name, text in SUBCOMMANDS.items()),
        "",
        "example:",
        f"  {PROG} fit --config configs/quickstart.yaml",
        "",
    ]
)


def main(args: list[str] | None = None) -> None:
    """``python -m lm_lightning`` and the ``lm-lightning`` command: the subcommands, ``export`` included."""
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP, end="")
        raise SystemExit(0 if argv else 2)
    if argv[0] == "export":
        export_main(argv[1:])
        return
    if argv[0] == "report":
        from lm_lightning.report import report_main

        report_main(argv[1:])
        return
    if argv[0] == "evaluate":
        from lm_lightning.evaluation.command import evaluate_main  # lm_eval is only imported when it runs

        evaluate_main(argv[1:], prog=f"{PROG} evaluate")
        return
    cli_main(args)  # None: LightningCLI reads sys.argv itself (and warns when given both)


def export_main(args: list[str]) -> None:
    """``export``: a checkpoint to a Hugging Face folder; settings errors exit with code 2."""
    from jsonargparse import auto_cli

    try:
        remember_argv(args)
        out = auto_cli(export_checkpoint, args=args, parser_class=ExportParser, prog=f"{PROG} export")
    except Exception as err:
        if is_user_error(err):
            report_and_exit(err, 2)
        raise
    print(f"Exported the model and tokenizer to {out}")


def cli_main(args: list[str] | None = None, run: bool = True) -> CausalLMCLI:
    """Run the CLI on ``args`` (default: ``sys.argv``); tests call it in-process."""
    # --help then shows the docstring under each field of dataclasses such as DecodingConfig. Only for help:
    # it compiles the source of every class in the parser, about 5 s of every start-up otherwise.
    argv = sys.argv[1:] if args is None else args
    wants_help = any(arg.startswith(("-h", "--help")) or arg.endswith(".help") for arg in argv)
    set_parsing_settings(docstring_parse_attribute_docstrings=wants_help)
    remember_argv(args)
    trainer_defaults: dict[str, Any] = {
        "precision": default_precision(),
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "runs", "name": "lm_lightning"},
        },
        # Persistent: added to whatever trainer.callbacks the config lists.
        "callbacks": [
            RunBanner(),
            TokensPerSecondProgressBar(),
            ValidationSummary(),
            CheckpointOnInterrupt(),
            CurvesCallback(),
        ],
        "gradient_clip_val": 1.0,  # transformers.Trainer's max_grad_norm default; null turns it off
    }
    try:
        return CausalLMCLI(
            CausalLMModule,
            CausalLMDataModule,
            trainer_defaults=trainer_defaults,
            save_config_kwargs={"overwrite": True},
            parser_class=CLIParser,
            parser_kwargs={"prog": PROG, "description": __doc__.splitlines()[0]},
            args=args,
            run=run,
        )
    except NonFiniteLossError as err:
        report_and_exit(err, 1)
    except Exception as err:
        if is_user_error(err):
            report_and_exit(err, 2)  # a settings error: the message says what to change
        raise


def run_root(logger_config: Any) -> Path | None:
    """``save_dir/name`` of a TensorBoard- or CSV-style logger config (a Namespace or dict), else ``None``."""
    init_args = _get(logger_config, "init_args")
    save_dir, name = _get(init_args, "save_dir"), _get(init_args, "name")
    if save_dir is None:
        return None
    return Path(save_dir) / (name or "")


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)
