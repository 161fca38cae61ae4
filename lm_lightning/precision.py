"""The precision a run gets when ``--trainer.precision`` is not given, and the line that says which it is.

``bf16-mixed`` where the hardware multiplies bf16 natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or
AMX-BF16 (there, ``torch.mm`` in bf16 runs 2.4 to 2.9 times the float32 rate; see docs/benchmarks.md section
13 for the learning parity this default is held to). ``32-true`` everywhere else. Detected from what torch
reports about the machine, not from a list of CPU models.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

# x86 features with bf16 dot products in hardware, in the order named: AMX's tiles first (the faster).
CPU_BF16_FEATURES = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}


def cpu_bf16_feature(capabilities: Mapping[str, Any] | None = None) -> str | None:
    """The name of this CPU's native bf16 matmul feature (``AMX-BF16``, ``AVX512-BF16``), or ``None``.

    ``capabilities`` is ``torch.cpu.get_capabilities()`` (torch >= 2.9; the default). Only x86 features are
    counted, and only where torch can use them (oneDNN is built in): ARM's bf16 instructions have not been
    measured here, so those CPUs keep float32.
    """
    if capabilities is None:
        get = getattr(torch.cpu, "get_capabilities", None)
        if get is None or not torch.backends.mkldnn.is_available():
            return None
        capabilities = get()
    for key, name in CPU_BF16_FEATURES.items():
        if capabilities.get(key):
            return name
    return None


def resolve_precision(given: str | int | None = None) -> tuple[str, str]:
    """The precision to run in and why: ``given`` (an explicit ``--trainer.precision``) always wins;
    otherwise ``bf16-mixed`` on a CUDA GPU with bf16 or a CPU with native bf16 matmul, else ``32-true``.

    A GPU, when one is visible, is where Lightning's ``auto`` accelerator trains, so it decides.
    """
    if given is not None:
        return str(given), "--trainer.precision"
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", f"default: {torch.cuda.get_device_name()} has bf16"
        return "32-true", f"default: {torch.cuda.get_device_name()} has no bf16"
    feature = cpu_bf16_feature()
    if feature is not None:
        return "bf16-mixed", f"default: this CPU has {feature}; --trainer.precision 32-true for float32"
    return "32-true", "default: this CPU has no native bf16 matmul"


def default_precision() -> str:
    """The precision of a run that does not set ``--trainer.precision`` (see ``resolve_precision``)."""
    return resolve_precision()[0]


def precision_reason(precision: Any) -> str:
    """Why a run has ``precision``: the default's reason, or ``--trainer.precision`` when it was given."""
    resolved, reason = resolve_precision()
    return reason if str(precision) == resolved else "--trainer.precision"
