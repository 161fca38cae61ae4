"""HarnessEvalCallback: lm-evaluation-harness scores during training, logged as ``eval/<task>/<metric>``."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from lm_lightning.data.tokenizer import find_tokenizer
from lm_lightning.evaluation.harness import (
    load_tasks,
    metric_values,
    parse_tasks,
    require_lm_eval,
    results_table,
    run_harness,
    task_manager,
)
from lm_lightning.model.checkpointing import collect_rng_states, set_rng_states
from lm_lightning.model.parallel import check_whole_parameters

_AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


class HarnessEvalCallback(L.Callback):
    """Runs lm-evaluation-harness tasks on the model every ``every_n_epochs`` training epochs.

    Each metric goes to the trainer's loggers as ``eval/<task>/<metric>`` (``.../<metric>/<filter>`` for a
    task's filter other than ``none``) at the current step, and the harness's table to the console; the
    latest results dict is kept in ``results``. The task names are checked and their data sets read at
    setup, so that a task that cannot run stops the fit before it trains. Only the global-zero process
    evaluates, and the others go on, so parameters sharded across processes (FSDP, DeepSpeed ZeRO-3) are
    refused at setup. The evaluation leaves the training untouched: every random generator's state and
    each module's train/eval mode are restored (the harness seeds the global generators). Under
    ``bf16-mixed`` or ``16-mixed`` the model runs under the same autocast.

    The LightningModule must hold the Hugging Face model as ``model`` (a peft model is evaluated with its
    adapters) and the tokenizer as ``tokenizer``, or the datamodule as ``tokenizer``.
    """

    def __init__(
        self,
        tasks: list[str] | str,
        every_n_epochs: int = 1,
        limit: int | float | None = None,
        num_fewshot: int | None = None,
        batch_size: int = 8,
        include_path: list[str] | str | None = None,
    ) -> None:
        """
        Args:
            tasks: Harness task names (a list, or one string separated by commas), e.g. ``python_docs_mc``.
            every_n_epochs: Evaluate at the end of every this many training epochs.
            limit: Documents per task (a fraction when below 1): the evaluation's cost at each epoch.
            num_fewshot: Examples in each prompt (default: the task's own, else 0).
            batch_size: Requests per forward pass.
            include_path: A folder of task YAML files of your own (or a list of folders).
        """
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs={every_n_epochs} is invalid: give an integer >= 1.")
        if limit is not None and limit <= 0:
            raise ValueError(f"limit={limit} is invalid: give a number of documents (>= 1) or a fraction.")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is invalid: it must be >= 1.")
        self.tasks = parse_tasks(tasks, "tasks")
        self.every_n_epochs = every_n_epochs
        self.limit = limit
        self.num_fewshot = num_fewshot
        self.batch_size = batch_size
        self.include_path = include_path
        self.results: dict[str, Any] | None = None
        self._manager: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_whole_parameters(trainer, "HarnessEvalCallback evaluates")
        if stage == "fit":  # on every process: a task that cannot run stops all of them, now
            require_lm_eval()
            self._manager = task_manager(self.tasks, self.include_path)
            load_tasks(self._manager, self.tasks)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Run the tasks now and log their metrics; on processes but global zero, nothing (``{}``)."""
        if not trainer.is_global_zero:
            return {}
        if self._manager is None:
            require_lm_eval()
            self._manager = task_manager(self.tasks, self.include_path)
        model, tokenizer = _model_and_tokenizer(trainer, pl_module)
        modes = {module: module.training for module in model.modules()}
        rng_states = collect_rng_states()
        try:
            results = run_harness(
                model,
                tokenizer,
                load_tasks(self._manager, self.tasks),  # fresh task objects: the harness keeps state in them
                self._manager,
                num_fewshot=self.num_fewshot,
                limit=self.limit,
                batch_size=self.batch_size,
                autocast_dtype=_AUTOCAST.get(str(trainer.precision)),
            )
        finally:
            set_rng_states(rng_states)
            for module, training in modes.items():
                module.train(training)
        values = metric_values(results)
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
        print(f"Harness tasks at epoch {trainer.current_epoch}, step {trainer.global_step}:")
        print(results_table(results))
        self.results = results
        return values


def _model_and_tokenizer(trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[torch.nn.Module, Any]:
    model = getattr(pl_module, "model", None)
    if not isinstance(model, torch.nn.Module) or getattr(model, "config", None) is None:
        raise AttributeError(
            f"HarnessEvalCallback needs the LightningModule to hold a Hugging Face causal LM as `.model`; "
            f"{type(pl_module).__name__}.model is {type(model).__name__}."
        )
    tokenizer = find_tokenizer(pl_module, trainer)
    if tokenizer is None:
        raise AttributeError(
            f"HarnessEvalCallback needs a tokenizer: set `.tokenizer` on {type(pl_module).__name__} or on "
            "the datamodule given to the Trainer."
        )
    return model, tokenizer
