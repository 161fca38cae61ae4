"""CausalLMModule: a Hugging Face causal LM trained with AdamW, logging exact perplexity."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lm_lightning.data.tokenizer import find_tokenizer, load_tokenizer
from lm_lightning.errors import check_compatible
from lm_lightning.generation.decoding import DecodingConfig, generate_texts, resolve_decodings
from lm_lightning.model.checkpointing import RNG_KEY, check_checkpoint, collect_rng_states, set_rng_states
from lm_lightning.model.export import check_export_dir, save_hf_folder
from lm_lightning.model.faults import NonFiniteAction, nonfinite_loss
from lm_lightning.model.flops import matmul_params, training_flops_per_batch
from lm_lightning.model.loss import TokenNLL, causal_lm_nll
from lm_lightning.model.optim import SCHEDULERS, SchedulerName, adamw, lr_schedule, parameter_groups

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CausalLMModule(L.LightningModule):
    """A causal language model (GPT-2 by default, any ``AutoModelForCausalLM``) for fit/validate/test.

    The model comes from ``model_name_or_path`` (pretrained weights) or, for training from scratch,
    from ``config_name`` and/or ``model_config`` (``GPT2Config``-style keys such as ``n_layer``,
    ``n_head``, ``n_embd``, ``n_positions``; ``model_type`` picks another architecture). The vocabulary
    size follows the tokenizer unless ``model_config`` sets it. The model is built in
    ``configure_model``, once the data module's tokenizer is known.

    Logged: ``train/loss`` and ``train/lr`` per step; ``val/loss``, ``val/perplexity`` (and
    ``test/...``) per epoch.
    Perplexity is ``exp(sum of token NLL / number of target tokens)`` over the whole split, summed
    across processes: a block of ``T`` tokens has ``T - 1`` targets (each token but the first), and
    labels of ``-100`` or positions with ``attention_mask == 0`` are not targets.

    Args:
        model_name_or_path: Hub name or local folder of pretrained weights (e.g. ``gpt2``).
        config_name: Hub name or folder of a config to train from scratch (random weights).
        model_config: Config values to train from scratch, or to override on ``config_name``.
        tokenizer: Tokenizer name or folder; default: the data module's tokenizer.
        dtype: Weights dtype (``float32``, ``bfloat16``, ``float16``); use ``trainer.precision`` for
            mixed precision.
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2`` (when installed).
        gradient_checkpointing: Recompute activations in the backward pass to save memory.
        compile: Compile the model with ``torch.compile``.
        learning_rate: AdamW peak learning rate.
        weight_decay: Decoupled weight decay, applied to weights only (not biases or norms).
        betas: AdamW betas.
        eps: AdamW epsilon.
        lr_scheduler: ``constant``, ``linear`` (decay to 0) or ``cosine``, stepped per optimizer step.
        warmup_steps: Linear warm-up steps.
        warmup_ratio: Warm-up as a share of all optimizer steps (used when ``warmup_steps`` is 0).
        loss_chunk_size: Positions per chunk of the vocabulary projection in the loss; ``None`` for the
            full logits at once.
        export_dir: Save a Hugging Face folder (model and tokenizer) here at the end of fit.
        predict_decodings: Decoding presets or settings that ``predict`` continues each prompt with;
            default ``["greedy"]`` (see ``lm_lightning.generation.decoding.PRESETS``).
        on_nonfinite_loss: On a NaN or infinite training loss, ``raise`` (stop, naming the step and the last
            good checkpoint) or ``skip`` the batch (no weight or optimizer update).
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        config_name: str | None = None,
        model_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        learning_rate: float = 2e-5,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        lr_scheduler: SchedulerName = "linear",
        warmup_steps: int = 0,
        warmup_ratio: float = 0.0,
        loss_chunk_size: int | None = 128,
        export_dir: str | None = None,
        predict_decodings: list[str | DecodingConfig | dict[str, Any]] | None = None,
        on_nonfinite_loss: NonFiniteAction = "raise",
    ) -> None:
        super().__init__()
        if model_name_or_path is None and config_name is None and model_config is None:
            raise ValueError(
                "No model given: set --model.model_name_or_path (pretrained, e.g. 'gpt2') or "
                "--model.model_config / --model.config_name (train from scratch)."
            )
        if model_name_or_path is not None and (config_name or model_config):
            raise ValueError(
                f"model_name_or_path={model_name_or_path!r} loads a pretrained model; config_name and "
                "model_config are for training from scratch. Set one or the other."
            )
        if lr_scheduler not in SCHEDULERS:
            raise ValueError(f"lr_scheduler={lr_scheduler!r} is unknown; choose one of {list(SCHEDULERS)}.")
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is unknown; choose one of {list(_DTYPES)}.")
        if not 0 <= warmup_ratio < 1:
            raise ValueError(f"warmup_ratio={warmup_ratio} must be in [0, 1).")
        if loss_chunk_size is not None and loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size={loss_chunk_size} must be a positive integer or None.")
        # Resolved now, so that an invalid decoding fails before any model is loaded.
        self.predict_decodings = resolve_decodings(predict_decodings or ["greedy"])
        if on_nonfinite_loss not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite_loss={on_nonfinite_loss!r} is unknown; choose 'raise' or 'skip'.")
        self.save_hyperparameters()
        self.model: PreTrainedModel | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.val_nll = TokenNLL()
        self.test_nll = TokenNLL()
        self._n_matmul_params: int | None = None  # counted before FSDP or compile wrap the model
        self._batch_shape: tuple[int, int] | None = None
        self._rng_states_to_restore: dict[str, Any] | None = None
        self._skip_optimizer_step = False

    # ----------------------------------------------------------------------------- model
    def _find_tokenizer(self) -> PreTrainedTokenizerBase | None:
        if self.tokenizer is not None:
            return self.tokenizer
        if self.hparams.tokenizer:
            self.tokenizer = load_tokenizer(self.hparams.tokenizer)
        elif (from_data := find_tokenizer(self, self._trainer)) is not None:
            self.tokenizer = from_data
            # Recorded so that a checkpoint loads with its tokenizer and no data module.
            self.hparams["tokenizer"] = getattr(self._trainer.datamodule, "tokenizer_path", None)
        elif self.hparams.model_name_or_path:
            self.tokenizer = load_tokenizer(self.hparams.model_name_or_path)
        return self.tokenizer

    def build_config(self, tokenizer: PreTrainedTokenizerBase | None = None) -> PretrainedConfig:
        """The model's config, without building the model (cheap: no weights are loaded)."""
        hp = self.hparams
        if hp.model_name_or_path:
            return AutoConfig.from_pretrained(hp.model_name_or_path)
        overrides = dict(hp.model_config or {})
        if tokenizer is not None:
            overrides.setdefault("vocab_size", len(tokenizer))
            if tokenizer.eos_token_id is not None:
                overrides.setdefault("eos_token_id", tokenizer.eos_token_id)
                overrides.setdefault("bos_token_id", tokenizer.bos_token_id or tokenizer.eos_token_id)
        if hp.config_name:
            config = AutoConfig.from_pretrained(hp.config_name, **overrides)
        else:
            config = AutoConfig.for_model(overrides.pop("model_type", "gpt2"), **overrides)
        if "vocab_size" not in overrides:
            raise ValueError(
                "Training from scratch needs the vocabulary size: give a tokenizer (--data.tokenizer) or "
                "--model.model_config.vocab_size."
            )
        return config

    def configure_model(self) -> None:
        """Build the Hugging Face model (from pretrained weights or from a config)."""
        if self.model is not None:
            return
        tokenizer = self._find_tokenizer()
        config = self.build_config(tokenizer)
        hp = self.hparams
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        predicting = self._trainer is not None and self._trainer.state.fn == "predict"
        # Prompts are not cut into blocks, so block_size only matters when training or evaluating.
        check_compatible(config, tokenizer, None if predicting else getattr(datamodule, "block_size", None))
        kwargs: dict[str, Any] = {}
        if hp.dtype:
            kwargs["dtype"] = _DTYPES[hp.dtype]
        if hp.attn_implementation:
            kwargs["attn_implementation"] = hp.attn_implementation
        if hp.model_name_or_path:
            model = AutoModelForCausalLM.from_pretrained(hp.model_name_or_path, **kwargs)
        else:
            model = AutoModelForCausalLM.from_config(config, **kwargs)
            # The resolved config (vocab size from the tokenizer) goes into the checkpoint's hparams.
            resolved = dict(hp.model_config or {})
            resolved["vocab_size"] = config.vocab_size
            for key in ("bos_token_id", "eos_token_id"):
                resolved.setdefault(key, getattr(config, key))
            self.hparams["model_config"] = resolved
        model.train()  # from_pretrained returns eval mode, and Lightning 2.6 keeps each module's mode
        self._n_matmul_params = matmul_params(model)
        if hp.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hp.compile:
            model.compile()  # in place: parameter names, and so checkpoints, stay those of the model
        self.model = model

    # ----------------------------------------------------------------------------- steps
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Any:
        """The wrapped model's forward pass."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def _nll(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return causal_lm_nll(
            self.model,
            batch["input_ids"],
            labels=batch.get("labels"),
            attention_mask=batch.get("attention_mask"),
            chunk_size=self.hparams.loss_chunk_size,
            position_ids=batch.get("position_ids"),  # packed examples (restarting at 0), else None
        )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Mean next-token loss of the batch."""
        self._batch_shape = tuple(batch["input_ids"].shape)
        nll, n_tokens = self._nll(batch)
        loss = nll / n_tokens
        zero_loss = nonfinite_loss(self, loss, batch_idx, self.hparams.get("on_nonfinite_loss", "raise"))
        self._skip_optimizer_step = zero_loss is not None
        if zero_loss is not None:
            return zero_loss
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        if self._trainer is not None and self.trainer.lr_scheduler_configs:
            self.log(
                "train/lr", self.trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0], on_step=True
            )
        return loss

    @property
    def flops_per_batch(self) -> int | None:
        """Model FLOPs of the last batch on this device, for ``LMThroughputMonitor``.

        Forward and backward in training; the forward third of it in validation.
        """
        if self.model is None or self._batch_shape is None:
            return None
        flops = training_flops_per_batch(self.model.config, *self._batch_shape, self._n_matmul_params)
        return flops if self.training else flops // 3

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the gradients of a skipped batch: AdamW then leaves the weights and its moments alone."""
        if self._skip_optimizer_step:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None

    # ----------------------------------------------------------------------------- exact resume
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the random state (dropout draws from it) for an exact resume."""
        checkpoint[RNG_KEY] = collect_rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the saved random state until training goes on (see ``on_train_batch_start``)."""
        self._rng_states_to_restore = checkpoint.get(RNG_KEY)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Restore the checkpoint's random state just before the first step after a resume.

        Not at load time: the sanity-check validation and loader set-up in between may draw from it.
        """
        if self._rng_states_to_restore is not None:
            set_rng_states(self._rng_states_to_restore)
            self._rng_states_to_restore = None

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Accumulate the batch's token NLL for the epoch's perplexity."""
        self._batch_shape = tuple(batch["input_ids"].shape)
        self.val_nll.update(*self._nll(batch))

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Accumulate the batch's token NLL for the test perplexity."""
        self.test_nll.update(*self._nll(batch))

    def predict_step(self, batch: list[str] | dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Continuations of a batch of prompts, one record per decoding and returned sequence.

        A dict batch holds rendered chat prompts and how to tokenize and stop them (``ChatPromptBatch``).
        """
        options = dict(batch) if isinstance(batch, dict) else {"prompts": batch}
        prompts = options.pop("prompts")
        return [
            dataclasses.asdict(sample)
            for name, decoding in self.predict_decodings
            for sample in generate_texts(
                self.model, self._find_tokenizer(), prompts, decoding, name, len(prompts), **options
            )
        ]

    def _log_split(self, split: str, metric: TokenNLL) -> None:
        mean_nll = metric.compute()  # already summed over processes by torchmetrics
        metric.reset()
        self.log(f"{split}/loss", mean_nll.float(), prog_bar=split == "val")
        self.log(f"{split}/perplexity", torch.exp(mean_nll).float(), prog_bar=split == "val")

    def on_validation_epoch_end(self) -> None:
        """Log ``val/loss`` and ``val/perplexity`` over the whole validation split."""
        self._log_split("val", self.val_nll)

    def on_test_epoch_end(self) -> None:
        """Log ``test/loss`` and ``test/perplexity`` over the whole test split."""
        self._log_split("test", self.test_nll)

    # ----------------------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (weight decay on weights only) and a per-step LR schedule over the whole fit."""
        hp = self.hparams
        groups = parameter_groups(self.model, hp.weight_decay)
        optimizer = adamw(groups, hp.learning_rate, hp.betas, hp.eps, next(self.model.parameters()).device)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = lr_schedule(hp.lr_scheduler, optimizer, total, hp.warmup_steps, hp.warmup_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------------------- export
    def export_hf(self, output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
        """Save the model and tokenizer as a Hugging Face folder (see ``lm_lightning.model.export``)."""
        if self.model is None:
            self.configure_model()
        return save_hf_folder(self.model, self._find_tokenizer(), output_dir, overwrite)

    def on_fit_end(self) -> None:
        """Export the Hugging Face folder when ``export_dir`` is set."""
        if self.hparams.export_dir and self.trainer.is_global_zero:
            self.export_hf(self.hparams.export_dir)


def export_checkpoint(*, ckpt_path: str, output_dir: str, overwrite: bool = False) -> Path:
    """Turn a ``CausalLMModule`` checkpoint into a Hugging Face folder (model and tokenizer).

    Args:
        ckpt_path: A checkpoint written by ``fit``.
        output_dir: A new or empty folder, or an earlier export; ``AutoModelForCausalLM.from_pretrained``
            loads it.
        overwrite: Also write into a folder that holds other files: its model and tokenizer files are
            replaced, the others kept.
    """
    check_export_dir(output_dir, overwrite)
    check_checkpoint(ckpt_path)  # refuses a file that is not a plain checkpoint of ours, before loading it
    module = CausalLMModule.load_from_checkpoint(ckpt_path, map_location="cpu")
    return module.export_hf(output_dir, overwrite)
