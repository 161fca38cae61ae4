"""``python -m lm_lightning {fit,validate,test,predict}``: LightningCLI over the module and data module."""

from __future__ import annotations

import copy
from typing import Any

import torch
from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lm_lightning.data import CausalLMDataModule
from lm_lightning.module import CausalLMModule, check_compatible
from lm_lightning.prediction import JSONLPredictionWriter
from lm_lightning.progress import TokensPerSecondProgressBar


def default_precision() -> str:
    """bf16 mixed precision on GPUs that support it, full float32 elsewhere."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


# Module arguments that decide the shape of the weights: a checkpoint's values win over the config's.
WEIGHT_DEFINING_KEYS = ("model_name_or_path", "config_name", "model_config", "tokenizer")


class CausalLMCLI(LightningCLI):
    """LightningCLI with the tokenizer linked from data to model and checkpointing on perplexity."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.tokenizer", "model.tokenizer")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(JSONLPredictionWriter, "predictions")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/perplexity",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch{epoch}-step{step}-ppl{val/perplexity:.2f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        self._given_config = copy.deepcopy(self.config)

    def before_instantiate_classes(self) -> None:
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

    def _check_model_data(self) -> None:
        # Fails before any data is tokenized or any weights are loaded (the model's config only).
        tokenizer = self.datamodule.tokenizer
        config = self.model.build_config(tokenizer)
        predicting = self.subcommand == "predict"
        check_compatible(config, tokenizer, None if predicting else self.datamodule.block_size)

    before_fit = before_validate = before_test = before_predict = _check_model_data


def cli_main(args: list[str] | None = None, run: bool = True) -> CausalLMCLI:
    """Run the CLI on ``args`` (default: ``sys.argv``); tests call it in-process."""
    # --help then shows the docstring under each field of dataclasses such as DecodingConfig.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    trainer_defaults: dict[str, Any] = {
        "precision": default_precision(),
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "runs", "name": "lm_lightning"},
        },
        # Persistent: added to whatever trainer.callbacks the config lists.
        "callbacks": [TokensPerSecondProgressBar()],
    }
    return CausalLMCLI(
        CausalLMModule,
        CausalLMDataModule,
        trainer_defaults=trainer_defaults,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
