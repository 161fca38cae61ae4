"""The module's settings, checked when it is built: each error names the setting and what is valid."""

from __future__ import annotations

from typing import Any

from lm_lightning.model.build import DTYPES
from lm_lightning.model.optim import SCHEDULERS


def check_module_settings(
    *,
    model_name_or_path: str | None,
    config_name: str | None,
    model_config: dict[str, Any] | None,
    dtype: str | None,
    lr_scheduler: str,
    warmup_ratio: float,
    loss_chunk_size: int | None,
    on_nonfinite_loss: str,
    lora: Any,
) -> None:
    """Raise ``ValueError`` for settings that cannot work together or are out of range."""
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
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is unknown; choose one of {list(DTYPES)}.")
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"warmup_ratio={warmup_ratio} must be in [0, 1).")
    if loss_chunk_size is not None and loss_chunk_size < 1:
        raise ValueError(f"loss_chunk_size={loss_chunk_size} must be a positive integer or None.")
    if on_nonfinite_loss not in ("raise", "skip"):
        raise ValueError(f"on_nonfinite_loss={on_nonfinite_loss!r} is unknown; choose 'raise' or 'skip'.")
    if lora is not None and model_name_or_path is None:
        raise ValueError(
            "lora is set but the model is trained from scratch: LoRA adapts pretrained weights. Set "
            "--model.model_name_or_path, or drop --model.lora to train all weights."
        )
