"""CausalLMModule: loss, exact perplexity, weight-decay groups, checkpoints and export."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from datasets import Dataset, DatasetDict
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lm_lightning import PRESETS, CausalLMDataModule, CausalLMModule, generate_texts
from lm_lightning.model.loss import causal_lm_nll
from lm_lightning.model.optim import parameter_groups

TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}


def _datamodule(tmp_path, tokenizer_path, texts, block_size=32, **kwargs) -> CausalLMDataModule:
    dsd = DatasetDict(
        {
            "train": Dataset.from_dict({"text": texts[:400]}),
            "validation": Dataset.from_dict({"text": texts[400:460]}),
        }
    )
    return CausalLMDataModule(
        tokenizer=tokenizer_path,
        dataset=dsd,
        block_size=block_size,
        cache_dir=str(tmp_path / "cache"),
        **kwargs,
    )


def _plain_torch_nll(model, blocks: torch.Tensor) -> tuple[float, int]:
    """Independent reference: full logits, one block at a time, summed in float64."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for block in blocks:
            logits = model(block[None]).logits[0, :-1].double()
            total += F.cross_entropy(logits, block[1:], reduction="sum").item()
            count += block.numel() - 1
    return total, count


def test_fit_lowers_training_loss(tmp_path, bpe_tokenizer_path, doc_texts):
    L.seed_everything(0)
    dm = _datamodule(tmp_path, bpe_tokenizer_path, doc_texts, batch_size=8)
    module = CausalLMModule(model_config=TINY, learning_rate=3e-3, lr_scheduler="constant")
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    quiet_trainer(tmp_path, max_steps=30, callbacks=[Record()], limit_val_batches=0).fit(module, dm)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5


def test_validate_perplexity_is_exact_with_a_smaller_last_batch(tmp_path, bpe_tokenizer_path, doc_texts):
    dm = _datamodule(tmp_path, bpe_tokenizer_path, doc_texts, eval_batch_size=4)
    module = CausalLMModule(model_config=TINY)
    dm.setup("validate")
    n_val = len(dm.datasets["validation"])
    assert n_val % 4 != 0, "the test needs a last batch smaller than the others"
    (metrics,) = quiet_trainer(tmp_path).validate(module, dm, verbose=False)
    total, count = _plain_torch_nll(module.model, dm.datasets["validation"][:]["input_ids"])
    assert count == n_val * 31  # block_size - 1 targets per block
    assert metrics["val/perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert metrics["val/loss"] == pytest.approx(total / count, rel=1e-5)
    # The mean of per-batch means (what the reference reports) is a different number here.
    with torch.no_grad():
        batch_means = [causal_lm_nll(module.model, b["input_ids"]) for b in dm.val_dataloader()]
    naive = sum((s / n).item() for s, n in batch_means) / len(batch_means)
    assert abs(naive - total / count) > 1e-4


def _tiny_lm(family: str, tiny_gpt2):
    """The tiny GPT-2 (tied head) or a tiny Llama (untied head), seeded."""
    torch.manual_seed(0)
    if family == "gpt2":
        return tiny_gpt2
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_chunked_loss_equals_full_logits_loss(tiny_gpt2, family):
    model = _tiny_lm(family, tiny_gpt2)
    ids = torch.randint(0, model.config.vocab_size, (3, 40))
    labels = ids.clone()
    labels[0, 5:9] = -100
    with torch.no_grad():
        full, n_full = causal_lm_nll(model, ids, labels, chunk_size=None)
        chunked, n_chunked = causal_lm_nll(model, ids, labels, chunk_size=7)
        hf_loss = model(ids, labels=labels).loss  # transformers' own mean over targets
    assert n_full == n_chunked == 3 * 39 - 4
    assert torch.allclose(full, chunked, rtol=1e-5)
    assert torch.allclose(full / n_full, hf_loss, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_chunked_loss_gradients_equal_full_logits_gradients(tiny_gpt2, family):
    # The chunked loss computes its gradients in the forward pass; they must be those of the plain loss,
    # through tied embeddings (gpt2) and untied heads (llama) alike, with ignored labels.
    model = _tiny_lm(family, tiny_gpt2)
    ids = torch.randint(0, model.config.vocab_size, (3, 40))
    labels = ids.clone()
    labels[1, 10:20] = -100

    def grads(chunk_size):
        model.zero_grad(set_to_none=True)
        nll, n = causal_lm_nll(model, ids, labels, chunk_size=chunk_size)
        (nll / n).backward()
        return nll.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    full_nll, full = grads(None)
    chunked_nll, chunked = grads(7)
    assert torch.allclose(full_nll, chunked_nll, rtol=1e-5)
    assert full.keys() == chunked.keys() and len(full) == len(list(model.parameters()))
    for name in full:
        assert torch.allclose(full[name], chunked[name], rtol=1e-4, atol=1e-7), name


def test_chunked_linear_cross_entropy_with_bias_matches_autograd():
    from lm_lightning.model.loss import _LinearCrossEntropy

    torch.manual_seed(0)
    hidden = torch.randn(23, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    targets[3] = -100
    expected = F.cross_entropy(hidden @ weight.t() + bias, targets, ignore_index=-100, reduction="sum")
    want = torch.autograd.grad(expected * 0.5, (hidden, weight, bias))
    got_loss = _LinearCrossEntropy.apply(hidden, weight, bias, targets, 5)
    got = torch.autograd.grad(got_loss * 0.5, (hidden, weight, bias))
    assert torch.allclose(got_loss, expected, rtol=1e-5)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6)


def test_weight_decay_groups(bpe_tokenizer):
    module = CausalLMModule(model_config=TINY, tokenizer=None, weight_decay=0.05)
    module.tokenizer = bpe_tokenizer
    module.configure_model()
    decay, no_decay = parameter_groups(module.model, module.hparams.weight_decay)
    names = {id(p): n for n, p in module.model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(n.endswith(".bias") or ".ln_" in n for n in no_decay_names)
    assert (
        "transformer.ln_f.weight" in no_decay_names and "transformer.h.0.attn.c_attn.bias" in no_decay_names
    )
    assert "transformer.wte.weight" in decay_names and "transformer.h.1.mlp.c_fc.weight" in decay_names
    assert not decay_names & no_decay_names
    n_params = sum(p.numel() for p in decay["params"] + no_decay["params"])
    assert n_params == sum(p.numel() for p in module.model.parameters())


def test_checkpoint_loads_alone_and_export_gives_identical_logits(tmp_path, bpe_tokenizer_path, doc_texts):
    dm = _datamodule(tmp_path, bpe_tokenizer_path, doc_texts)
    module = CausalLMModule(model_config=TINY, learning_rate=1e-3)
    trainer = quiet_trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(module, dm)
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)

    restored = CausalLMModule.load_from_checkpoint(ckpt)  # no data module, no extra arguments
    assert restored.hparams.model_config["vocab_size"] == len(dm.tokenizer)
    ids = torch.randint(0, len(dm.tokenizer), (2, 20))
    module.model.eval()
    restored.model.eval()
    with torch.no_grad():
        expected = module.model(ids).logits
        assert torch.equal(restored.model(ids).logits, expected)
        out = restored.export_hf(tmp_path / "hf")
        hf = AutoModelForCausalLM.from_pretrained(out).eval()
        assert torch.equal(hf(ids).logits, expected)
    assert (out / "tokenizer.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.tmp")]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr_scheduler": "exponential"}, "lr_scheduler='exponential' is unknown"),
        ({"model_config": None}, "No model given"),
        ({"model_name_or_path": "gpt2"}, "Set one or the other"),
        ({"warmup_ratio": 1.5}, "warmup_ratio=1.5"),
    ],
)
def test_bad_module_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CausalLMModule(**{"model_config": TINY, **kwargs})


def test_block_size_above_context_fails_before_training(tmp_path, bpe_tokenizer_path, doc_texts):
    dm = _datamodule(tmp_path, bpe_tokenizer_path, doc_texts, block_size=65)
    module = CausalLMModule(model_config=TINY)  # n_positions 64
    with pytest.raises(ValueError, match=r"block_size=65 is larger than the model's context of 64"):
        quiet_trainer(tmp_path, max_steps=1).fit(module, dm)
    assert module.model is None


def test_tokenizer_larger_than_embedding_fails(tmp_path, bpe_tokenizer_path, doc_texts):
    dm = _datamodule(tmp_path, bpe_tokenizer_path, doc_texts)
    module = CausalLMModule(model_config={**TINY, "vocab_size": 100})
    with pytest.raises(ValueError, match=r"tokenizer has 512 tokens but the model's embedding has 100 rows"):
        quiet_trainer(tmp_path, max_steps=1).fit(module, dm)


def test_lr_schedule_warms_up_then_decays_per_optimizer_step(tmp_path, bpe_tokenizer_path, doc_texts):
    dm = _datamodule(tmp_path, bpe_tokenizer_path, doc_texts, batch_size=8)
    module = CausalLMModule(model_config=TINY, learning_rate=1e-3, warmup_steps=4, lr_scheduler="linear")
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = quiet_trainer(tmp_path, max_steps=10, callbacks=[Record()], limit_val_batches=0)
    trainer.fit(module, dm)
    # Linear warm-up over 4 steps to 1e-3, then linear decay to 0 at step 10 (estimated_stepping_batches).
    expected = [1e-3 * s / 4 for s in range(4)] + [1e-3 * (10 - s) / 6 for s in range(4, 10)]
    assert lrs == pytest.approx(expected, rel=1e-6)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(bpe_tokenizer):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = CausalLMModule(
            model_config={**TINY, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
            gradient_checkpointing=checkpointing,
        )
        module.tokenizer = bpe_tokenizer
        module.configure_model()
        assert module.model.is_gradient_checkpointing == checkpointing
        ids = torch.randint(0, 512, (2, 32))
        loss = module.training_step({"input_ids": ids}, 0)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in module.model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = grads
    assert torch.allclose(loss_a, loss_b)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_a, grads_b, strict=True))


def test_predict_from_a_hf_folder_with_prompts_only(tmp_path, tiny_gpt2, bpe_tokenizer):
    tiny_gpt2.save_pretrained(tmp_path / "hf")
    bpe_tokenizer.save_pretrained(tmp_path / "hf")
    hf = str(tmp_path / "hf")
    prompts = ["The for statement", "import os", "class A:"]
    data = CausalLMDataModule(tokenizer=hf, prompts=prompts, eval_batch_size=2, block_size=4096)  # no corpus
    module = CausalLMModule(
        model_name_or_path=hf, predict_decodings=["greedy", {"preset": "beam", "max_new_tokens": 7}]
    )
    batches = quiet_trainer(tmp_path).predict(module, data)
    records = [r for batch in batches for r in batch]
    beam = "beam(max_new_tokens=7)"
    first_batch = [("The for statement", "greedy"), ("import os", "greedy"), ("The for statement", beam)]
    assert [(r["prompt"], r["preset"]) for r in records[:4]] == [*first_batch, ("import os", beam)]
    expected = generate_texts(tiny_gpt2, bpe_tokenizer, prompts, PRESETS["greedy"], "greedy")
    assert [r["text"] for r in records if r["preset"] == "greedy"] == [e.text for e in expected]
    with pytest.raises(ValueError, match="No data source"):
        data.train_dataloader()


def test_plain_trainer_with_default_logger_and_tokenizer_from_the_data_module(
    tmp_path, bpe_tokenizer_path, doc_texts
):
    """The README's Python example: the module takes its tokenizer from the data module alone."""
    dm = _datamodule(tmp_path, bpe_tokenizer_path, doc_texts)
    module = CausalLMModule(model_config=TINY)  # no tokenizer given
    trainer = L.Trainer(
        max_steps=2, limit_val_batches=2, enable_progress_bar=False, default_root_dir=str(tmp_path)
    )
    trainer.fit(module, dm)  # the default TensorBoard logger logs both modules' hyperparameters
    restored = CausalLMModule.load_from_checkpoint(trainer.checkpoint_callback.best_model_path)
    assert restored.hparams.tokenizer == bpe_tokenizer_path
    assert restored.export_hf(tmp_path / "hf").joinpath("tokenizer.json").exists()


def test_bos_token_id_zero_is_kept(bpe_tokenizer):
    bpe_tokenizer.bos_token = bpe_tokenizer.convert_ids_to_tokens(0)
    bpe_tokenizer.eos_token = bpe_tokenizer.convert_ids_to_tokens(1)
    assert bpe_tokenizer.bos_token_id == 0 and bpe_tokenizer.eos_token_id == 1
    config = CausalLMModule(model_config={"n_layer": 1}).build_config(bpe_tokenizer)
    assert config.bos_token_id == 0 and config.eos_token_id == 1  # not eos in place of a falsy 0
