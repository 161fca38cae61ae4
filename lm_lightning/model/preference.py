"""PreferenceTuning: the DPO side of ``CausalLMModule`` (``objective='dpo'``), as a mixin of its hooks.

A batch of ``B`` pairs is ``2B`` sequences (``lm_lightning.data.preference``); the policy scores them in one
forward pass and the reference (``lm_lightning.model.reference``) in another, or not at all when its
log-probabilities were precomputed. The losses are ``lm_lightning.model.dpo``'s.

Under DDP and gradient accumulation, the step's loss is the mean over every pair of every micro-batch and
process: each micro-batch's objective is the sum of its pairs' losses divided by the step's number of pairs.
FSDP2 (``ModelParallelStrategy``) is refused: its sharded model takes neither a second forward pass through a
frozen copy nor the chunked head.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn

from lm_lightning.errors import RunError
from lm_lightning.model.dpo import (
    REWARD_NAMES,
    DPOSettings,
    PreferenceMetrics,
    dpo_settings,
    pair_losses,
    pair_rewards,
)
from lm_lightning.model.logprobs import sequence_logprobs
from lm_lightning.model.reference import REFERENCE_KEY, Reference, build_reference


def disable_dropout(model: nn.Module) -> None:
    """Every ``nn.Dropout`` of ``model`` (LoRA's included) set to ``p = 0``, as trl's ``disable_dropout``."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


class PreferenceTuning:
    """Hooks and steps of preference tuning for a LightningModule with a ``model`` and ``hparams``; before
    ``LightningModule`` in the bases. Each hook calls ``super()``'s, so that other mix-ins' hooks run too."""

    def init_objective(self, objective: str, dpo: Any, model_name_or_path: str | None) -> None:
        """Set ``self.dpo`` (``None`` for the next-token objective) and the state preference tuning needs."""
        self.dpo: DPOSettings | None = dpo_settings(objective, dpo, model_name_or_path)
        self.val_pairs = PreferenceMetrics() if self.dpo else None
        self.test_pairs = PreferenceMetrics() if self.dpo else None
        # None: the policy is the starting model; else a restored checkpoint's reference key ("" if none).
        self.reference_key: str | None = None
        self.reference: Reference | None = None
        self.loss_unit = "rows" if self.dpo else "targets"  # what a step's loss is the mean over (model.step)

    # ----------------------------------------------------------------------------- checks and reference
    def setup(self, stage: str) -> None:
        """Refuse, before the model is built, a strategy or data that the objective cannot work with; then the
        other mix-ins' ``setup``."""
        trainer = self._trainer
        if self.dpo is not None and isinstance(getattr(trainer, "strategy", None), ModelParallelStrategy):
            raise RunError(
                "objective='dpo' does not run under FSDP2 (ModelParallelStrategy / FSDP2Strategy): use DDP "
                "(--trainer.strategy ddp), with LoRA (--model.lora) for a large model."
            )
        data_format = getattr(getattr(trainer, "datamodule", None), "data_format", None)
        if stage != "predict" and self.dpo is not None and data_format not in (None, "preference"):
            raise RunError(
                f"objective='dpo' trains on preference pairs, and this data is {data_format!r}: give columns "
                "'chosen' and 'rejected' (and 'prompt'), or set --model.objective lm."
            )
        if stage != "predict" and self.dpo is None and data_format == "preference":
            raise RunError(
                "The data is preference pairs ('chosen' and 'rejected' columns), which the next-token "
                "objective does not train on: set --model.objective dpo (and --model.model_name_or_path)."
            )
        super().setup(stage)

    def _prepare_reference(self, splits: list[str]) -> None:
        if self.dpo is None or (self.reference is not None and self.reference.has(splits)):
            return
        self.reference = build_reference(self, splits, self.reference)

    def on_fit_start(self) -> None:
        """Dropout off (``dpo.disable_dropout``); the reference ready for the train and validation pairs."""
        super().on_fit_start()
        if self.dpo is not None and self.dpo.disable_dropout:
            disable_dropout(self.model)
        self._prepare_reference(["train", "validation"])

    def on_validation_start(self) -> None:
        """The reference ready for the validation pairs."""
        super().on_validation_start()
        self._prepare_reference(["validation"])

    def on_test_start(self) -> None:
        """The reference ready for the test pairs."""
        super().on_test_start()
        self._prepare_reference(["test"])

    def save_reference_key(self, checkpoint: dict[str, Any]) -> None:
        """Record the precomputed reference's fingerprint (never the reference's weights)."""
        if self.reference is not None and self.reference.key:
            checkpoint[REFERENCE_KEY] = self.reference.key

    def load_reference_key(self, checkpoint: dict[str, Any]) -> None:
        """The policy is now a checkpoint's: the reference is the starting model, found by its key."""
        self.reference_key = checkpoint.get(REFERENCE_KEY, "")

    # ----------------------------------------------------------------------------- steps
    def pair_step(self, batch: dict[str, Tensor], split: str) -> tuple[Tensor, ...]:
        """Per pair the loss and the chosen and rejected rewards; per sequence the policy's completion
        log-probabilities and their numbers of tokens."""
        chunk_size = self.hparams.loss_chunk_size
        policy, n_targets = sequence_logprobs(
            self.model, batch["input_ids"], batch["labels"], batch.get("attention_mask"), chunk_size
        )
        reference = self.reference.logprobs(self.model, batch, split, chunk_size)
        return (*pair_losses(policy, reference, n_targets, self.dpo), policy, n_targets)

    def preference_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """This micro-batch's share of its optimizer step's mean DPO loss (``lm_lightning.model.step``: the
        sum of its pairs' losses over the step's number of pairs), and the sums of its pairs' rewards, which
        the step's one sync turns into ``train/rewards/...``: means over every pair of the step."""
        losses, chosen, rejected, _, n_targets = self.pair_step(batch, "train")
        real = (n_targets.view(2, -1) > 0).all(0)  # the padding rows of an epoch's last step have no target
        zero = torch.zeros_like(losses)
        rewards = pair_rewards(chosen, rejected)
        sums = {name: torch.where(real, value, zero).sum() for name, value in rewards.items()}
        loss_sum = torch.where(real, losses, zero).sum()
        return self.step_loss.objective(self, batch, loss_sum, real.sum(), batch_idx, extras=sums)

    def update_pair_metrics(self, batch: dict[str, Tensor], split: str, metric: PreferenceMetrics) -> None:
        """Add an evaluation batch's pairs to ``metric``."""
        metric.update(*self.pair_step(batch, split))

    def log_pair_metrics(self, split: str, metric: PreferenceMetrics) -> None:
        """Log ``{split}/loss`` (the DPO loss), the rewards, and the chosen and rejected perplexities."""
        values = metric.compute()  # already summed over processes by torchmetrics
        metric.reset()
        for name in ("loss", *REWARD_NAMES, "perplexity", "perplexity_rejected"):
            self.log(f"{split}/{name}", values[name].float(), prog_bar=split == "val" and name == "loss")
