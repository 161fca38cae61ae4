"""LoRA adapters through ``peft``: settings, the modules they adapt, small checkpoints, merged export, QLoRA.

Only the adapters train (``peft`` freezes the rest). A checkpoint keeps the trainable tensors alone (and the
optimizer state, which only covers them); the frozen base comes back from ``model_name_or_path`` when the
checkpoint is loaded, so a LoRA checkpoint needs its base model where it is loaded (its fingerprint is
checked). ``export`` folds the adapters into a plain Hugging Face model, or writes the adapter folder that
``peft.PeftModel.from_pretrained(base, dir)`` loads.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from typing import Any, Literal

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from lm_lightning.errors import RunError

LoraBias = Literal["none", "all", "lora_only"]
BASE_FINGERPRINT_KEY = "lm_lightning_lora_base"


@dataclasses.dataclass
class LoraSettings:
    """LoRA on a pretrained model (``peft.LoraConfig``).

    Args:
        r: Rank of the update matrices.
        alpha: Scale: the update is multiplied by ``alpha / r``.
        dropout: Dropout on the adapters' input.
        target_modules: Names of the modules to adapt (leaf names such as ``q_proj``, or regexes as in
            ``peft``); default: ``peft``'s choice for the architecture, else every linear layer but the
            output head.
        bias: Which biases train too: ``none``, ``all`` or ``lora_only``.
        load_in_4bit: QLoRA: load the frozen base in 4-bit NF4 through ``bitsandbytes`` (CUDA GPUs only).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | None = None
    bias: LoraBias = "none"
    load_in_4bit: bool = False

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r={self.r} must be a positive integer (the adapters' rank), e.g. 8.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout={self.dropout} must be in [0, 1).")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"lora.bias={self.bias!r} is unknown; choose 'none', 'all' or 'lora_only'.")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("lora.target_modules=[] is invalid: give module names, or null for the default.")


def lora_settings(value: LoraSettings | dict[str, Any] | None) -> LoraSettings | None:
    """Settings from a ``LoraSettings``, a mapping (a checkpoint's hyper-parameters) or ``None`` (no LoRA)."""
    if value is None or isinstance(value, LoraSettings):
        return value
    if isinstance(value, dict):
        unknown = set(value) - {f.name for f in dataclasses.fields(LoraSettings)}
        if unknown:
            raise ValueError(f"lora={value!r} is invalid: unknown keys {sorted(unknown)}.")
        return LoraSettings(**value)
    raise ValueError(f"lora={value!r} is invalid: give a mapping such as {{r: 8, alpha: 16}}.")


def default_target_modules(model: PreTrainedModel) -> list[str]:
    """``peft``'s default target modules for the architecture; else every ``nn.Linear`` but the output head.

    Always an explicit list: with ``target_modules=None`` peft 0.21 finds nothing to adapt in Mixtral under
    transformers 5, and ``"all-linear"`` adapts the fused experts of mixture-of-experts models through
    parameter wrappers that refuse dropout.
    """
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    default = DEFAULTS.get(model.config.model_type)
    if isinstance(default, list | tuple | set):
        return sorted(default)
    head = model.get_output_embeddings()
    names = {
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head
    }
    if not names:
        raise RunError(
            f"LoRA found no linear layer to adapt in {type(model).__name__}: set --model.lora.target_modules."
        )
    return sorted(names)


def apply_lora(model: PreTrainedModel, settings: LoraSettings) -> nn.Module:
    """``model`` wrapped in a ``peft.PeftModel`` with fresh adapters; only they (and chosen biases) train."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets = settings.target_modules or default_target_modules(model)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(targets),
        bias=settings.bias,
        task_type="CAUSAL_LM",
    )
    if settings.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # peft's NoMatchingPeftModuleError
        raise RunError(
            f"lora.target_modules={list(targets)!r} matches no module of {type(model).__name__} ({err}). "
            "Give names of its linear layers (e.g. q_proj, v_proj), or null for the default."
        ) from err


def is_peft_model(model: nn.Module | None) -> bool:
    """Whether ``model`` is a ``peft`` ``PeftModel``."""
    return model is not None and callable(getattr(model, "get_base_model", None))


def frozen_state_keys(module: nn.Module) -> set[str]:
    """The keys of ``module.state_dict()`` that do not train: the base model under LoRA, buffers included."""
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    return {key for key in module.state_dict() if key not in trainable}


def drop_frozen(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Keep only the trainable tensors in ``checkpoint["state_dict"]``, and the base config's fingerprint."""
    frozen = frozen_state_keys(module)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
    checkpoint[BASE_FINGERPRINT_KEY] = config_fingerprint(module.model.get_base_model().config)


def restore_frozen(module: nn.Module, checkpoint: dict[str, Any], base_name: str | None) -> None:
    """Fill ``checkpoint["state_dict"]`` with the rebuilt base model's frozen tensors (strict loading holds).

    Refuses a base model whose config differs from the one the adapters were trained on.
    """
    expected = checkpoint.get(BASE_FINGERPRINT_KEY)
    if expected and expected != config_fingerprint(module.model.get_base_model().config):
        raise RunError(
            f"This LoRA checkpoint was trained on another base model than model_name_or_path={base_name!r} "
            "(their configs differ): load it with the base model it was trained on."
        )
    state = module.state_dict()
    for key in frozen_state_keys(module):
        checkpoint["state_dict"].setdefault(key, state[key])


def config_fingerprint(config: PretrainedConfig) -> str:
    """A hash of a base model's config, recorded in LoRA checkpoints to notice a different base."""
    data = config.to_dict()
    for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation"):
        data.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def merged_model(
    model: nn.Module, settings: LoraSettings | None = None, base_name: str | None = None
) -> PreTrainedModel:
    """A plain Hugging Face model with the adapters folded into its weights; ``model`` is left as it is.

    ``merge_and_unload`` changes the model it is called on, so it runs on a copy. Under QLoRA the adapters
    are merged into the base model loaded again in full precision (``base_name``): merged into the 4-bit
    weights, the sum would be rounded to 4 bits.
    """
    if settings is not None and settings.load_in_4bit:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict
        from transformers import AutoModelForCausalLM

        full = dataclasses.replace(settings, load_in_4bit=False)
        unquantized = apply_lora(AutoModelForCausalLM.from_pretrained(base_name), full)
        set_peft_model_state_dict(unquantized, get_peft_model_state_dict(model))
        return unquantized.merge_and_unload()
    return copy.deepcopy(model).merge_and_unload()


def check_qlora(settings: LoraSettings | None, accelerator: str, from_scratch: bool) -> None:
    """Refuse a 4-bit base (QLoRA) that cannot work here, before anything is loaded."""
    if settings is None or not settings.load_in_4bit:
        return
    from transformers.utils import is_bitsandbytes_available

    if from_scratch:
        raise RunError("lora.load_in_4bit=true quantizes pretrained weights: set --model.model_name_or_path.")
    if "cuda" not in accelerator and accelerator != "gpu":
        raise RunError(
            f"lora.load_in_4bit=true (QLoRA) runs on a CUDA GPU through bitsandbytes; this run's accelerator "
            f"is {accelerator!r}. On CPU, set --model.lora.load_in_4bit false (plain LoRA)."
        )
    if not is_bitsandbytes_available():
        raise RunError(
            "lora.load_in_4bit=true (QLoRA) needs the bitsandbytes package, which is not installed: "
            "pip install bitsandbytes, or set --model.lora.load_in_4bit false."
        )


def quantization_kwargs(settings: LoraSettings | None, device: torch.device) -> dict[str, Any]:
    """``from_pretrained`` arguments for a 4-bit NF4 base on ``device`` (QLoRA), or none."""
    if settings is None or not settings.load_in_4bit:
        return {}
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return {"quantization_config": config, "device_map": {"": device}}
