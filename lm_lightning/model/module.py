"""CausalLMModule: a Hugging Face causal LM trained with AdamW, logging exact perplexity."""

from __future__ import annotations

import contextvars
import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from transformers import (
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lm_lightning.data.tokenizer import find_tokenizer, load_tokenizer
from lm_lightning.errors import RunError, check_compatible
from lm_lightning.generation.decoding import DecodingConfig, generate_texts, resolve_decodings
from lm_lightning.model.build import build_model, model_config, model_kwargs, prepare_model
from lm_lightning.model.checkpointing import check_checkpoint
from lm_lightning.model.dpo import DPOSettings, Objective
from lm_lightning.model.export import check_export_dir, fit_export_dir, save_hf_folder
from lm_lightning.model.faults import NonFiniteAction
from lm_lightning.model.flops import matmul_params, training_flops_per_batch
from lm_lightning.model.lora import (
    LoraSettings,
    drop_frozen,
    is_peft_model,
    lora_settings,
    merged_model,
    restore_frozen,
)
from lm_lightning.model.loss import TokenNLL, causal_lm_loss, unwrap_model
from lm_lightning.model.optim import ClipsFusedUnderBf16Mixed, SchedulerName, optimizers
from lm_lightning.model.parallel import is_sharded
from lm_lightning.model.portable import (
    add_portable_parts,
    model_from_checkpoint,
    portable_parts,
    read_portable_parts,
)
from lm_lightning.model.preference import PreferenceTuning
from lm_lightning.model.settings import check_module_settings
from lm_lightning.model.sharded import consolidated, export_sharded, sharded_model
from lm_lightning.model.training import ExactTraining

# Set while ``load_from_checkpoint`` runs: the model is then built in ``on_load_checkpoint``.
_LOADING_CHECKPOINT = contextvars.ContextVar("lm_lightning_loading_checkpoint", default=False)


class CausalLMModule(PreferenceTuning, ExactTraining, ClipsFusedUnderBf16Mixed, L.LightningModule):
    """A causal language model (GPT-2 by default, any ``AutoModelForCausalLM``) for fit/validate/test.

    The model comes from ``model_name_or_path`` (pretrained weights) or, for training from scratch,
    from ``config_name`` and/or ``model_config`` (``GPT2Config``-style keys such as ``n_layer``,
    ``n_head``, ``n_embd``, ``n_positions``; ``model_type`` picks another architecture). The vocabulary
    size follows the tokenizer unless ``model_config`` sets it. The model is built in
    ``configure_model``, once the data module's tokenizer is known.

    The optimizer step is the unit of the loss: ``train/loss`` is the summed NLL over every target of every
    micro-batch on every process, divided by the step's number of targets, and the update does not depend on
    how a global batch is split into processes and micro-batches (``lm_lightning.model.step``). It is decided
    with one collective and one host sync a step. Logged: ``train/loss`` and ``train/lr`` per step;
    ``val/loss``, ``val/perplexity`` (and ``test/...``) per epoch.

    A mixture of experts (Mixtral, Qwen-MoE, OLMoE...) also trains on its router's load-balancing loss, the
    model's own ``aux_loss`` of each micro-batch, weighted by ``router_aux_loss_coef`` as transformers does,
    and averaged over the step's micro-batches on all processes: ``train/loss + router_aux_loss_coef *
    train/aux_loss``. On one micro-batch this is transformers' objective; under accumulation or DDP,
    transformers 5.24's ``Trainer`` (``num_items_in_batch``, ``average_tokens_across_devices``) instead sums
    ``router_aux_loss_coef * aux_loss`` over the micro-batches and processes, so its weight against the
    next-token loss grows with their number. Not kept: a load-balancing loss is a statistic of each
    micro-batch's routing, so no weighting makes it independent of the split, and the mean at least keeps its
    weight the same. The perplexities are of the next-token loss alone.

    Perplexity is ``exp(sum of token NLL / number of target tokens)`` over the whole split, summed
    across processes: a block of ``T`` tokens has ``T - 1`` targets (each token but the first), and
    labels of ``-100`` or positions with ``attention_mask == 0`` are not targets.

    Args:
        model_name_or_path: Hub name or local folder of pretrained weights (e.g. ``gpt2``).
        config_name: Hub name or folder of a config to train from scratch (random weights).
        model_config: Config values to train from scratch, or to override on ``config_name``.
        tokenizer: Tokenizer name or folder; default: the data module's tokenizer (which is the model's own,
            from ``model_name_or_path``, unless given).
        dtype: Weights dtype (``float32``, ``bfloat16``, ``float16``); use ``trainer.precision`` for
            mixed precision.
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2`` (when installed).
        gradient_checkpointing: Recompute activations in the backward pass to save memory.
        compile: Compile the transformer blocks and the chunked loss with ``torch.compile`` (not in predict).
        learning_rate: AdamW peak learning rate.
        weight_decay: Decoupled weight decay, applied to weights only (not biases or norms).
        betas: AdamW betas.
        eps: AdamW epsilon.
        lr_scheduler: ``constant``, ``linear`` (decay to 0) or ``cosine``, stepped per optimizer step.
        warmup_steps: Linear warm-up steps.
        warmup_ratio: Warm-up as a share of all optimizer steps (used when ``warmup_steps`` is 0).
        loss_chunk_size: Positions of each sequence per chunk of the vocabulary projection in the loss (a
            chunk holds ``batch_size * loss_chunk_size`` rows of float32 logits); ``None`` for all at once.
        export_dir: Save a Hugging Face folder (model and tokenizer) here at the end of fit; ``True``: in the
            run's own folder (``runs/NAME/version_N/hf_model``). A folder holding another run's export is
            refused before training.
        predict_decodings: Decoding presets or settings that ``predict`` continues each prompt with;
            default ``["greedy"]`` (see ``lm_lightning.generation.decoding.PRESETS``).
        on_nonfinite_loss: On a NaN or infinite training loss, ``raise`` (stop, naming the step and the last
            good checkpoint) or ``skip`` the batch (no weight or optimizer update).
        lora: Train LoRA adapters on the pretrained model instead of all its weights
            (``lm_lightning.model.lora.LoraSettings``: ``r``, ``alpha``, ``dropout``, ``target_modules``,
            ``bias``, ``load_in_4bit``); checkpoints then hold the adapters only.
        objective: ``lm`` (the next-token loss) or ``dpo`` (preference tuning on ``chosen``/``rejected``
            pairs against the starting model: ``lm_lightning.model.preference``).
        dpo: With ``objective='dpo'``, ``lm_lightning.model.dpo.DPOSettings``: ``beta``, ``loss``
            (``sigmoid``, ``ipo``, ``hinge``), ``label_smoothing``, ``precompute_reference``.
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
        export_dir: bool | str | None = None,
        predict_decodings: list[str | DecodingConfig | dict[str, Any]] | None = None,
        on_nonfinite_loss: NonFiniteAction = "raise",
        lora: LoraSettings | None = None,
        objective: Objective = "lm",
        dpo: DPOSettings | None = None,
    ) -> None:
        super().__init__()
        self.lora = lora_settings(lora)
        check_module_settings(
            model_name_or_path=model_name_or_path, config_name=config_name, model_config=model_config,
            dtype=dtype, lr_scheduler=lr_scheduler, warmup_ratio=warmup_ratio,
            loss_chunk_size=loss_chunk_size, on_nonfinite_loss=on_nonfinite_loss, lora=self.lora,
        )  # fmt: skip
        # Resolved now, so that an invalid decoding fails before any model is loaded.
        self.predict_decodings = resolve_decodings(predict_decodings or ["greedy"])
        self.init_objective(objective, dpo, model_name_or_path)
        self.save_hyperparameters(ignore=["lora", "dpo"])
        # Plain data in checkpoints, which weights_only loading accepts.
        for name, settings in (("lora", self.lora), ("dpo", self.dpo)):
            self.hparams[name] = dataclasses.asdict(settings) if settings else None
        self.model: PreTrainedModel | None = None
        self.exported: Path | None = None  # the folder fit exported to (export_dir)
        self._checkpoint_config: PretrainedConfig | None = None  # a checkpoint's own, once known
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.val_nll = TokenNLL()
        self.test_nll = TokenNLL()
        self._n_matmul_params: int | None = None  # counted before FSDP or compile wrap the model
        self._batch_shape: tuple[int, int] | None = None
        self.init_exact_training()  # steps, boundaries, random state, schedule (lm_lightning.model.training)

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
        return self._checkpoint_config or model_config(self.hparams, tokenizer)

    @classmethod
    def load_from_checkpoint(cls, *args: Any, **kwargs: Any) -> CausalLMModule:  # type: ignore[override]
        """Lightning's; the model is built from the checkpoint's own config and weights."""
        token = _LOADING_CHECKPOINT.set(True)
        try:
            return super().load_from_checkpoint(*args, **kwargs)
        finally:
            _LOADING_CHECKPOINT.reset(token)

    def use_checkpoint(self, path: str | os.PathLike) -> None:
        """Take the model's config and tokenizer from the checkpoint that the trainer will restore.

        The model is then built from them and the checkpoint's weights when it is restored, without reading
        the hub, a tokenizer folder or the base weights (``fit``/``validate``/``predict`` ``--ckpt_path``).
        """
        config, tokenizer = read_portable_parts(path)
        self._checkpoint_config = config
        if tokenizer is not None:
            self.tokenizer = tokenizer

    def _built_from_checkpoint(self) -> bool:
        if _LOADING_CHECKPOINT.get():
            return True
        # FSDP-style strategies restore after sharding the model: it must exist before then.
        restores_late = self._trainer is not None and self._trainer.strategy.restore_checkpoint_after_setup
        return self._checkpoint_config is not None and not restores_late

    def configure_model(self) -> None:
        """Build the Hugging Face model (from pretrained weights or from a config), with LoRA adapters if set.

        When a checkpoint is about to be restored, ``on_load_checkpoint`` builds it from the checkpoint.
        """
        if self.model is None and not self._built_from_checkpoint():
            self._set_model(self._build_model())

    def _build_model(self) -> torch.nn.Module:
        tokenizer = self._find_tokenizer()
        config = self.build_config(tokenizer)
        trainer = self._trainer
        predicting = trainer is not None and trainer.state.fn == "predict"
        # Prompts are not cut into blocks, so block_size only matters when training or evaluating.
        block_size = None if predicting else getattr(getattr(trainer, "datamodule", None), "block_size", None)
        check_compatible(config, tokenizer, block_size)
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        from_checkpoint = self._checkpoint_config is not None
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 (see lm_lightning.model.sharded)
            load = lambda: build_model(self.hparams, config, self.lora, device, from_checkpoint)  # noqa: E731
            model = sharded_model(self, config, load)
        else:
            model = build_model(self.hparams, config, self.lora, device, weights_follow=from_checkpoint)
        if not self.hparams.model_name_or_path and not from_checkpoint:
            # The resolved config (vocab size from the tokenizer) goes into the checkpoint's hparams.
            resolved = dict(self.hparams.model_config or {})
            for key in ("vocab_size", "bos_token_id", "eos_token_id"):
                resolved[key] = resolved.get(key, getattr(config, key))
            self.hparams["model_config"] = resolved
        return model

    def _set_model(self, model: torch.nn.Module) -> None:
        self._n_matmul_params = matmul_params(unwrap_model(model))  # before compile or FSDP wrap it
        hp = self.hparams
        # Not when predicting: generation with a growing KV cache would recompile at every length.
        compile = hp.compile and not (self._trainer is not None and self._trainer.state.fn == "predict")
        self.model = model if is_sharded(model) else prepare_model(model, hp.gradient_checkpointing, compile)

    # ----------------------------------------------------------------------------- steps
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Any:
        """The wrapped model's forward pass."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def _nll(
        self, batch: dict[str, Tensor], router_aux_loss: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        return causal_lm_loss(
            self.model,
            batch["input_ids"],
            labels=batch.get("labels"),
            attention_mask=batch.get("attention_mask"),
            # FSDP2 gathers the root's parameters (embeddings, head) in the model's forward hooks, which the
            # chunked loss (trunk, then head) would bypass: sharded models take the plain path.
            chunk_size=None if is_sharded(self.model) else self.hparams.loss_chunk_size,
            router_aux_loss=router_aux_loss,
            position_ids=batch.get("position_ids"),  # packed examples (restarting at 0), else None
            compile=self.hparams.compile,
        )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """This micro-batch's share of its optimizer step's mean loss (``model.step``): the next-token loss,
        or with ``objective='dpo'`` the DPO loss (``model.preference``)."""
        self._batch_shape = tuple(batch["input_ids"].shape)
        if self.dpo is not None:
            return self.preference_step(batch, batch_idx)
        nll, n_targets, aux = self._nll(batch, router_aux_loss=True)
        coef = unwrap_model(self.model).config.router_aux_loss_coef if aux is not None else 0.0
        return self.step_loss.objective(self, batch, nll, n_targets, batch_idx, aux, coef)

    @property
    def flops_per_batch(self) -> int | None:
        """Model FLOPs of the last batch on this device, for ``LMThroughputMonitor``.

        Forward and backward in training; the forward third of it in validation.
        """
        if self.model is None or self._batch_shape is None:
            return None
        flops = training_flops_per_batch(
            unwrap_model(self.model).config, *self._batch_shape, self._n_matmul_params
        )
        return flops if self.training else flops // 3

    # ----------------------------------------------------------------------------- exact resume
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the random states and the step boundary for an exact resume (``save_training_state``), the
        model's config and tokenizer (the checkpoint travels: ``lm_lightning.model.portable``); under LoRA,
        the adapters alone; the key of a precomputed DPO reference, never a reference's weights."""
        self.save_training_state(checkpoint)
        self.save_reference_key(checkpoint)
        config = unwrap_model(self.model).config
        add_portable_parts(checkpoint, config, self._find_tokenizer())
        if is_peft_model(self.model):
            drop_frozen(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Build the model from the checkpoint when it is not built yet (``configure_model``), and keep the
        saved random state and schedule until training goes on (``load_training_state``)."""
        self.load_training_state(checkpoint)
        self.load_reference_key(checkpoint)
        config, tokenizer = portable_parts(checkpoint)
        self.tokenizer = tokenizer or self.tokenizer
        if self.model is None:
            self._checkpoint_config = config or self._checkpoint_config
            if self._checkpoint_config is None or self.lora is not None:
                self._set_model(self._build_model())  # an older checkpoint, or LoRA: from the base model
            else:
                kwargs = model_kwargs(self.hparams)
                self._set_model(model_from_checkpoint(self._checkpoint_config, checkpoint, **kwargs))
        if is_peft_model(self.model):
            restore_frozen(self, checkpoint, self.hparams.model_name_or_path)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Accumulate the batch's token NLL for the epoch's perplexity (or its pairs' DPO loss, rewards)."""
        self._batch_shape = tuple(batch["input_ids"].shape)
        if self.dpo is not None:
            return self.update_pair_metrics(batch, "validation", self.val_pairs)
        self.val_nll.update(*self._nll(batch)[:2])

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Accumulate the batch's token NLL for the test perplexity (or its pairs' DPO loss and rewards)."""
        if self.dpo is not None:
            return self.update_pair_metrics(batch, "test", self.test_pairs)
        self.test_nll.update(*self._nll(batch)[:2])

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
        if self.dpo is not None:
            return self.log_pair_metrics(split, self.val_pairs if split == "val" else self.test_pairs)
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
        self.plan_schedule(self.hparams.lr_scheduler, self.hparams.warmup_ratio)
        return optimizers(self.model, self.hparams, self.trainer)

    # ----------------------------------------------------------------------------- export
    def export_hf(
        self,
        output_dir: str | os.PathLike,
        overwrite: bool = False,
        adapter_only: bool = False,
        run: Any = None,
    ) -> Path:
        """Save the model and tokenizer as a Hugging Face folder (see ``lm_lightning.model.export``).

        Under LoRA: the model with the adapters merged into its weights, or with ``adapter_only`` the adapter
        folder that ``peft.PeftModel.from_pretrained(base, output_dir)`` loads. ``run``: the fit's log folder,
        recorded in the export.
        """
        if self.model is None:
            self.configure_model()
        model = self.model
        if adapter_only and not is_peft_model(model):
            raise RunError(
                "adapter_only=true exports LoRA adapters, and this model has none (no --model.lora)."
            )
        if is_peft_model(model) and not adapter_only:
            model = merged_model(model, self.lora, self.hparams.model_name_or_path)
        return save_hf_folder(model, self._find_tokenizer(), output_dir, overwrite, run)

    def on_fit_end(self) -> None:
        """Export the Hugging Face folder when ``export_dir`` is set (``self.exported``: where)."""
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks
        path = fit_export_dir(self.hparams.export_dir, log_dir)
        if path is not None and is_sharded(self.model):  # every rank gathers its shards, rank 0 writes
            export_sharded(self.model, self._find_tokenizer(), path, self.trainer.is_global_zero, run=log_dir)
        elif path is not None and self.trainer.is_global_zero:
            self.export_hf(path, run=log_dir)
        self.exported = path


def export_checkpoint(
    *, ckpt_path: str, output_dir: str, overwrite: bool = False, adapter_only: bool = False
) -> Path:
    """Turn a ``CausalLMModule`` checkpoint into a Hugging Face folder (model and tokenizer).

    Args:
        ckpt_path: A checkpoint written by ``fit``: a file, or a sharded (FSDP2) checkpoint folder.
        output_dir: A new or empty folder, or an earlier export; ``AutoModelForCausalLM.from_pretrained``
            loads it.
        overwrite: Also write into a folder that holds other files: its model and tokenizer files are
            replaced, the others kept.
        adapter_only: For a LoRA checkpoint, write the adapter folder (``PeftModel.from_pretrained(base,
            dir)``) instead of the model with the adapters merged in.
    """
    check_export_dir(output_dir, overwrite)
    check_checkpoint(ckpt_path)  # refuses a file that is not a plain checkpoint of ours, before loading it
    with consolidated(ckpt_path) as path:  # a sharded folder: its shards gathered into one file
        module = CausalLMModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    return module.export_hf(output_dir, overwrite, adapter_only)
