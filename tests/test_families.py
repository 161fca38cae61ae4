"""The family matrix: each architecture trains, measures, exports and samples through the module, exactly.

Each family is a tiny random config saved as a pretrained folder with its own (locally trained) tokenizer, so
the data module takes the model's own tokenizer, as it does for a hub model.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from datasets import Dataset, DatasetDict
from transformers import AutoConfig, AutoModelForCausalLM

from lm_lightning import CausalLMDataModule, CausalLMModule, TextGenerationCallback, generate_texts
from lm_lightning.model.loss import causal_lm_loss, head_transform, supports_chunked_loss

COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=256,
)
# What each family needs beyond the common keys to build at this size (grouped-query attention where it has
# it, a pad id inside the vocabulary, OPT's projected embeddings, Gemma-2's soft-capped head).
FAMILIES = {
    "gpt2": {},
    "llama": dict(num_key_value_heads=2),
    "qwen3": dict(num_key_value_heads=2, head_dim=16),
    "mistral": dict(num_key_value_heads=2, head_dim=16),
    "gpt_neox": {},
    "opt": dict(ffn_dim=128, word_embed_proj_dim=32, pad_token_id=0),
    "phi3": dict(num_key_value_heads=2, pad_token_id=0),
    "gemma2": dict(num_key_value_heads=2, head_dim=16, pad_token_id=0, final_logit_softcapping=30.0),
    "mixtral": dict(num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2),
}
# Families whose head transforms the logits (Cohere scales, Granite divides): loss-level checks only.
TRANSFORMED = {
    "cohere": dict(num_key_value_heads=2, pad_token_id=0, logit_scale=0.0625),
    "granite": dict(num_key_value_heads=2, logits_scaling=8.0),
}


def tiny_config(family: str, **overrides):
    return AutoConfig.for_model(family, **{**COMMON, **{**FAMILIES, **TRANSFORMED}[family], **overrides})


def pretrained_folder(family: str, tmp_path, tokenizer) -> str:
    torch.manual_seed(0)
    config = tiny_config(family, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    folder = tmp_path / family
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def texts(doc_texts) -> DatasetDict:
    return DatasetDict(
        {
            "train": Dataset.from_dict({"text": doc_texts[:120]}),
            "validation": Dataset.from_dict({"text": doc_texts[120:140]}),
        }
    )


def own_logits_nll(model, blocks: torch.Tensor) -> tuple[float, int]:
    """The reference: the model's own full logits, one block at a time, summed in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for block in blocks:
            logits = model(input_ids=block[None]).logits[0, :-1].double()
            total += F.cross_entropy(logits, block[1:], reduction="sum").item()
            count += block.numel() - 1
    return total, count


class _Logged(TextGenerationCallback):
    """The generation callback, also keeping what the training step logged."""

    aux: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if "train/aux_loss" in trainer.callback_metrics:
            self.aux.append(trainer.callback_metrics["train/aux_loss"].item())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_measures_exports_and_samples(family, tmp_path, bpe_tokenizer, texts):
    folder = pretrained_folder(family, tmp_path, bpe_tokenizer)
    # No tokenizer given: the data module takes the model's own.
    data = CausalLMDataModule(
        dataset=texts, block_size=32, batch_size=4, eval_batch_size=3, cache_dir=str(tmp_path / "cache")
    )
    module = CausalLMModule(model_name_or_path=folder, learning_rate=3e-3, loss_chunk_size=16)
    callback = _Logged(prompts=["The for statement"], decodings=["greedy"], max_new_tokens=6)
    callback.aux = []
    trainer = quiet_trainer(tmp_path, max_steps=3, val_check_interval=3, callbacks=[callback])
    before = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(folder).state_dict().items()}
    trainer.fit(module, data)
    assert data.tokenizer_path == folder and module.hparams.tokenizer == folder
    assert supports_chunked_loss(module.model)  # the chunked path is the one measured below
    changed = [k for k, v in module.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "training changed no weight"

    # Validation perplexity over the whole split equals the model's own logits, token-weighted.
    (metrics,) = trainer.validate(module, data, verbose=False)
    module.eval()
    total, count = own_logits_nll(module.model, data.datasets["validation"][:]["input_ids"])
    assert metrics["val/perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)

    # The generation callback ran after the validation in fit and after this one, greedy, on this model.
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[-1]["prompt"] == "The for statement" and rows[-1]["num_new_tokens"] > 0

    # Export, reload with transformers alone: identical logits, and the same greedy continuation.
    module.export_hf(tmp_path / "hf")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = data.datasets["validation"][:2]["input_ids"]
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, module.model(input_ids=ids).logits)
    name, decoding = callback.decodings[0]
    (sample,) = generate_texts(reloaded, data.tokenizer, ["The for statement"], decoding, name)
    assert sample.text == rows[-1]["text"]

    if family == "mixtral":  # the router's load-balancing loss trained too, and was logged apart
        assert len(callback.aux) == 3 and all(a > 0 for a in callback.aux)
    else:
        assert callback.aux == []


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite", "mixtral"])
def test_chunked_loss_applies_the_family_head_values_and_gradients(family):
    # Soft-capping (Gemma-2), a logit scale (Cohere) or divisor (Granite) after the head, and a router's
    # auxiliary loss (Mixtral): the chunked loss equals the model's own logits, in value and gradient.
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    assert head_transform(model.config) != {} or family == "mixtral"
    ids = torch.randint(0, 512, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0

    def loss_and_grads(chunk_size):
        model.zero_grad(set_to_none=True)
        nll, n, aux = causal_lm_loss(
            model, ids, attention_mask=mask, chunk_size=chunk_size, router_aux_loss=True
        )
        loss = nll / n + (0 if aux is None else model.config.router_aux_loss_coef * aux)
        loss.backward()
        return (
            nll.detach(),
            aux,
            {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None},
        )

    full_nll, full_aux, full = loss_and_grads(None)
    chunked_nll, chunked_aux, chunked = loss_and_grads(7)
    # The full path is the model's own logits, unchanged; so is transformers' own loss.
    with torch.no_grad():
        labels = ids.masked_fill(mask == 0, -100)
        own = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.allclose(full_nll / (mask[:, 1:].sum()), own, rtol=1e-5)
    assert torch.allclose(full_nll, chunked_nll, rtol=1e-5)
    assert (full_aux is None) == (family != "mixtral") and (chunked_aux is None) == (family != "mixtral")
    if full_aux is not None:
        assert torch.allclose(full_aux, chunked_aux)
    assert full.keys() == chunked.keys() and len(full) == len(list(model.parameters()))
    for name in full:
        assert torch.allclose(full[name], chunked[name], rtol=1e-4, atol=1e-7), name


def _more_padding(batch, extra):
    """``batch`` with ``extra`` more padding positions on every row, as the collator pads."""
    pad = {"input_ids": 0, "labels": -100, "attention_mask": 0}
    out = {k: F.pad(v, (0, extra), value=pad[k]) for k, v in batch.items() if k in pad}
    if "position_ids" in batch:
        positions = batch["position_ids"]
        out["position_ids"] = torch.cat([positions, positions[:, -1:] + 1 + torch.arange(extra)], dim=1)
    return out


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_router_loss_leaves_padding_out(family):
    """A mixture of experts' load-balancing loss is over the real tokens: the same for the same examples
    unpacked or packed, and with more padding (the mask, or packed the padding after each row's examples)."""
    from lm_lightning.data.examples import PadCollator

    extra = dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    extra["shared_expert_intermediate_size"] = 32
    config = (
        tiny_config("mixtral") if family == "mixtral" else AutoConfig.for_model(family, **COMMON, **extra)
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    g = torch.Generator().manual_seed(0)
    examples = [torch.randint(1, 512, (n,), generator=g) for n in (9, 23, 14, 5)]
    unpacked = PadCollator(0)([{"input_ids": x, "labels": x} for x in examples])
    packed_rows = [torch.cat(examples[:2]), torch.cat(examples[2:])]  # 32 and 19 tokens
    positions = [torch.cat([torch.arange(len(x)) for x in pair]) for pair in (examples[:2], examples[2:])]
    packed = PadCollator(0)(
        [
            {"input_ids": r, "labels": r, "position_ids": p}
            for r, p in zip(packed_rows, positions, strict=True)
        ]
    )
    auxes = []
    for batch in (unpacked, _more_padding(unpacked, 9), packed, _more_padding(packed, 9)):
        for chunk_size in (None, 7):
            with torch.no_grad():
                _, _, aux = causal_lm_loss(
                    model, batch["input_ids"], batch["labels"], batch.get("attention_mask"), chunk_size,
                    router_aux_loss=True, position_ids=batch.get("position_ids"),
                )  # fmt: skip
            auxes.append(aux.item())
    assert auxes == pytest.approx([auxes[0]] * len(auxes), rel=1e-5)


def test_unknown_family_falls_back_to_full_logits():
    config = AutoConfig.for_model("gemma3_text", **COMMON, num_key_value_heads=2, head_dim=16, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config)
    assert head_transform(config) is None and not supports_chunked_loss(model)
