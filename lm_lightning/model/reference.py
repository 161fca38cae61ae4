"""The reference model of preference tuning: the policy with its LoRA adapters disabled, a frozen copy of the
starting model, or the starting model's log-probabilities computed once and stored with the cached data.

Checkpoints never hold the reference. Under LoRA it is the base model, which a LoRA checkpoint rebuilds from
``model_name_or_path`` anyway; a frozen copy is loaded again from ``model_name_or_path``; precomputed
log-probabilities are found again by the fingerprint of the starting weights, which checkpoints record, and
are computed again from ``model_name_or_path`` when the cache no longer has them.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from lm_lightning.data.preference import PairCollator
from lm_lightning.errors import RunError
from lm_lightning.model.build import build_model
from lm_lightning.model.checkpointing import atomic_torch_save
from lm_lightning.model.logprobs import sequence_logprobs
from lm_lightning.model.lora import is_peft_model
from lm_lightning.model.loss import unwrap_model

REFERENCE_KEY = "lm_lightning_dpo_reference"  # in checkpoints: the fingerprint of the precomputed reference


class Reference:
    """Where a batch's reference log-probabilities come from: ``tables`` (precomputed, per split, indexed by
    ``pair_id``), else ``model`` (a frozen copy), else the policy with its adapters disabled.

    Not an ``nn.Module``, so that a frozen copy stays out of the module's ``state_dict``, its parameters, its
    dtype and device casts, and DDP's broadcasts.
    """

    def __init__(
        self, model: nn.Module | None = None, tables: dict[str, Tensor] | None = None, key: str | None = None
    ) -> None:
        self.model = model
        self.tables = tables
        self.key = key

    def has(self, splits: list[str]) -> bool:
        """Whether this reference serves ``splits`` (a model serves every split)."""
        return self.tables is None or all(split in self.tables for split in splits)

    def logprobs(
        self, policy: nn.Module, batch: dict[str, Tensor], split: str, chunk_size: int | None
    ) -> Tensor:
        """The ``(2B,)`` reference log-probabilities of the batch's completions, chosen sides first."""
        if self.tables is not None:
            pairs = self.tables[split][batch["pair_id"]]  # (B, 2)
            return torch.cat([pairs[:, 0], pairs[:, 1]])
        return reference_logprobs(self.model if self.model is not None else policy, batch, chunk_size)


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """No gradient, evaluation mode (no dropout, no activation checkpointing), adapters disabled."""
    training = model.training
    adapters = model.disable_adapter() if is_peft_model(model) else contextlib.nullcontext()
    model.eval()
    try:
        with torch.no_grad(), adapters:
            yield
    finally:
        model.train(training)


def reference_logprobs(model: nn.Module, batch: dict[str, Tensor], chunk_size: int | None) -> Tensor:
    """The completions' log-probabilities under ``model`` as the reference: frozen, adapters disabled."""
    with _frozen(model):
        logps, _ = sequence_logprobs(
            model, batch["input_ids"], batch["labels"], batch.get("attention_mask"), chunk_size
        )
    return logps


def load_reference_model(module: Any) -> nn.Module:
    """The starting model again, from ``model_name_or_path``: frozen, on the policy's device, in its dtype."""
    param = next(p for p in module.model.parameters() if p.is_floating_point())
    config = unwrap_model(module.model).config
    model = build_model(module.hparams, config, None, param.device)
    return model.to(device=param.device, dtype=param.dtype).eval().requires_grad_(False)


def reference_fingerprint(model: nn.Module, precision: str) -> str:
    """A hash of the reference's weights (adapters left out) and of how it computes: the key of its
    precomputed log-probabilities."""
    digest = hashlib.sha256(f"{precision}|{unwrap_model(model).config._attn_implementation}".encode())
    state = unwrap_model(model).state_dict()
    for name in sorted(state):
        if "lora_" in name:
            continue
        tensor = state[name].detach().cpu().contiguous()
        digest.update(name.replace(".base_layer.", ".").encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:20]


def build_reference(module: Any, splits: list[str], previous: Reference | None) -> Reference:
    """The reference for ``splits`` of the module's datamodule (``module.dpo`` says which kind)."""
    if not module.dpo.precompute_reference:
        if is_peft_model(module.model):
            return Reference()
        return previous if previous is not None else Reference(model=load_reference_model(module))
    return precomputed_reference(module, splits, previous)


def precomputed_reference(module: Any, splits: list[str], previous: Reference | None) -> Reference:
    """Reference log-probabilities of every pair of ``splits``, read from the data cache or computed once.

    ``module.reference_key`` is ``None`` when the policy is the starting model (no checkpoint restored); the
    key of a restored checkpoint (empty if it has none) otherwise. Under LoRA the policy with its adapters
    disabled is the starting model in any case.
    """
    trainer = module.trainer
    datamodule = trainer.datamodule
    precision = str(trainer.precision)
    source = module.model if module.reference_key is None or is_peft_model(module.model) else None
    key = (previous.key if previous is not None else None) or module.reference_key
    if not key and source is not None:
        key = reference_fingerprint(source, precision)
    folder = getattr(datamodule, "cache_path", None)
    path = Path(folder) / "reference" / f"{key}.pt" if folder is not None and key else None
    tables = dict(previous.tables) if previous is not None and previous.tables is not None else {}
    if path is not None and path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        tables.update({split: table for split, table in stored.items() if split not in tables})
    datasets = getattr(datamodule, "datasets", {})
    missing = [split for split in splits if split not in tables and split in datasets]
    if missing:
        if source is None:  # a checkpoint's policy: the starting model again, then freed
            source = load_reference_model(module)
            found = reference_fingerprint(source, precision)
            if key and found != key:
                raise RunError(
                    "The precomputed reference log-probabilities of this run are not in the data cache, and "
                    f"model_name_or_path={module.hparams.model_name_or_path!r} is no longer the model the "
                    "run started from (its weights differ): give the starting model, or the cache it wrote."
                )
            key = found
        collate = PairCollator(datamodule.tokenizer.pad_token_id or 0)
        batch_size = getattr(datamodule, "eval_batch_size", 8)
        for split in missing:
            tables[split] = _compute_table(module, source, datasets[split], collate, batch_size, split)
        if folder is not None:  # stored with the cached data, under the reference's fingerprint
            path = Path(folder) / "reference" / f"{key}.pt"
            if trainer.is_global_zero:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_torch_save(tables, path)
            trainer.strategy.barrier("lm_lightning_reference")
    device = next(module.model.parameters()).device
    return Reference(tables={split: t.to(device) for split, t in tables.items()}, key=key)


def _compute_table(
    module: Any, model: nn.Module, dataset: Dataset, collate: Any, batch_size: int, split: str
) -> Tensor:
    """``(n, 2)`` float32: the chosen and rejected log-probabilities of every pair, by ``pair_id``. Each
    process scores its share of the pairs; a sum across processes puts them together."""
    from tqdm.auto import tqdm

    trainer = module.trainer
    device = next(model.parameters()).device
    ids = dataset["pair_id"][:]  # a tensor (the dataset is torch-formatted)
    table = torch.zeros(int(ids.max()) + 1 if len(ids) else 0, 2, dtype=torch.float32, device=device)
    share = Subset(dataset, range(trainer.global_rank, len(dataset), trainer.world_size))
    loader = DataLoader(share, batch_size=batch_size, collate_fn=collate)
    bar = tqdm(loader, desc=f"Reference log-probabilities ({split})", disable=not trainer.is_global_zero)
    for batch in bar:
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        with trainer.precision_plugin.forward_context():
            logps = reference_logprobs(model, batch, module.hparams.loss_chunk_size)
        table[batch["pair_id"]] = torch.stack(logps.float().chunk(2), dim=1)
    if trainer.world_size > 1:
        torch.distributed.all_reduce(table)  # each pair was scored by one process, the others hold 0
    return table.cpu()
