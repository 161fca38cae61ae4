"""Scale: multi-process fit from the CLI, the block wrap policy, FLOPs, MFU, accumulation."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import quiet_trainer
from datasets import Dataset, DatasetDict
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch.trainer.states import RunningStage
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointWrapper,
    apply_activation_checkpointing,
)
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from lm_lightning import CausalLMDataModule, CausalLMModule
from lm_lightning.model.flops import LMThroughputMonitor, matmul_params, meta_model, training_flops_per_batch
from lm_lightning.model.parallel import transformer_block_classes, transformer_block_policy

CONFIGS = Path(__file__).parents[1] / "configs"
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}
TINY_LLAMA = LlamaConfig(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4
)


# ------------------------------------------------------------------------------- several processes
@pytest.mark.slow
def test_two_process_ddp_streaming_fit_gives_a_checkpoint_one_process_loads_and_exports(
    tmp_path, bpe_tokenizer_path, doc_texts
):
    for i in range(4):  # four shards: two per rank
        (tmp_path / f"train-{i}.txt").write_text("".join(doc_texts[i * 100 : (i + 1) * 100]))
    (tmp_path / "valid.txt").write_text("".join(doc_texts[500:540]))
    config = {
        "seed_everything": 1,
        "trainer": {
            "accelerator": "cpu",
            "devices": 2,
            "strategy": "ddp",
            "max_steps": 3,
            "val_check_interval": 3,
            "limit_val_batches": 2,
            "log_every_n_steps": 1,
            "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path / "runs"), "name": "ddp"},
            },
            "callbacks": [
                {"class_path": "lm_lightning.LMThroughputMonitor", "init_args": {"window_size": 2}}
            ],
        },
        "model": {"model_config": TINY, "learning_rate": 1e-3},
        "data": {
            "tokenizer": bpe_tokenizer_path,
            "data_files": {"train": str(tmp_path / "train-*.txt"), "validation": str(tmp_path / "valid.txt")},
            "streaming": True,
            "block_size": 64,
            "batch_size": 4,
            "cache_dir": str(tmp_path / "cache"),
        },
    }
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(config))
    fit = subprocess.run(
        [sys.executable, "-m", "lm_lightning", "fit", "--config", str(tmp_path / "ddp.yaml")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    run = tmp_path / "runs" / "ddp" / "version_0"
    ckpt_path = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    # The stream's position (rank 0's) is in the checkpoint, for a mid-pass resume.
    assert "'given':" in str(ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"])
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("train/items_per_sec") for r in rows)  # tokens/s from the ThroughputMonitor
    assert any(r.get("val/perplexity") for r in rows)

    module = CausalLMModule.load_from_checkpoint(ckpt_path, map_location="cpu").eval()
    out = module.export_hf(tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert torch.equal(module.model(x).logits, exported(x).logits)


# ------------------------------------------------------------------------------- FSDP wrap policy
@pytest.mark.parametrize(
    ("config", "blocks"),
    [
        (GPT2Config(**TINY), ["transformer.h.0", "transformer.h.1"]),
        (TINY_LLAMA, [f"model.layers.{i}" for i in range(3)]),
    ],
)
def test_wrap_policy_selects_exactly_the_transformer_blocks(config, blocks):
    model = AutoModelForCausalLM.from_config(config)
    selected = [name for name, m in model.named_modules() if transformer_block_policy(m, False, 0)]
    assert selected == blocks
    assert all(transformer_block_policy(m, True, 0) for m in model.modules())  # descends everywhere
    assert transformer_block_classes(config) == {type(model.get_submodule(blocks[0]))}


def test_activation_checkpointing_on_the_blocks_keeps_loss_and_gradients():
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(
        GPT2Config(**TINY, vocab_size=128, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    )
    ckpt = AutoModelForCausalLM.from_config(plain.config)
    ckpt.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(ckpt, auto_wrap_policy=transformer_block_policy)
    wrapped = [n for n, m in ckpt.named_modules() if isinstance(m, CheckpointWrapper)]
    assert wrapped == ["transformer.h.0", "transformer.h.1"]
    x = torch.randint(0, 128, (2, 16))
    losses = [m(x, labels=x).loss for m in (plain, ckpt)]
    for loss in losses:
        loss.backward()
    assert torch.allclose(losses[0], losses[1])
    grad = dict(ckpt.named_parameters())
    for name, p in plain.named_parameters():
        key = name.replace("transformer.h.0.", "transformer.h.0._checkpoint_wrapped_module.").replace(
            "transformer.h.1.", "transformer.h.1._checkpoint_wrapped_module."
        )
        assert torch.allclose(p.grad, grad[key].grad, atol=1e-6), name


# ------------------------------------------------------------------------------- FLOPs and MFU
@pytest.mark.parametrize(
    ("config", "seq"),
    [(GPT2Config(**TINY, vocab_size=128), 32), (TINY_LLAMA, 32), (GPT2Config(), 1024)],
    ids=["tiny-gpt2", "tiny-llama", "gpt2-124m"],
)
def test_flops_formula_matches_torch_flop_counter(config, seq):
    config._attn_implementation = "eager"  # the counter sees the attention matmuls as bmm
    batch = 2
    model = meta_model(config)
    x = torch.randint(0, 128, (batch, seq), device="meta")
    measured = measure_flops(model, lambda: model(x).logits, loss_fn=lambda y: y.sum())
    ours = training_flops_per_batch(config, batch, seq)
    # The formula leaves out norms, softmax and the causal mask's savings (none in eager attention).
    assert abs(ours - measured) / measured < 0.02, (ours, measured)
    assert matmul_params(model) == sum(  # embedding lookups are not matmuls, a tied head is one
        p.numel()
        for n, p in model.named_parameters()
        if p.dim() == 2 and "embed" not in n and "wte" not in n and "wpe" not in n
    ) + (model.get_output_embeddings().weight.numel() if model.config.tie_word_embeddings else 0)


def _tiny_fit(
    tmp_path, tokenizer_path, texts, callbacks=(), batch_size=4, eps=1e-8, model_config=None, **trainer_kwargs
):
    dsd = DatasetDict(
        {
            "train": Dataset.from_dict({"text": texts[:300]}),
            "validation": Dataset.from_dict({"text": texts[300:340]}),
        }
    )
    data = CausalLMDataModule(
        tokenizer=tokenizer_path,
        dataset=dsd,
        block_size=32,
        batch_size=batch_size,
        cache_dir=str(tmp_path / "c"),
    )
    model = CausalLMModule(
        model_config=model_config or TINY,
        tokenizer=tokenizer_path,
        learning_rate=1e-2,
        eps=eps,
        lr_scheduler="constant",
    )
    trainer = quiet_trainer(
        tmp_path, **{"max_steps": 4, "limit_val_batches": 0, **trainer_kwargs}, callbacks=list(callbacks)
    )
    L.seed_everything(0)
    trainer.fit(model, data)
    return model, trainer


def test_throughput_monitor_logs_tokens_and_mfu_from_the_configured_peak(
    tmp_path, bpe_tokenizer_path, doc_texts
):
    monitor = LMThroughputMonitor(peak_flops=1e12, window_size=2)
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="tp")
    model, trainer = _tiny_fit(
        tmp_path, bpe_tokenizer_path, doc_texts, [monitor], logger=logger, log_every_n_steps=1
    )
    assert "from the config" in monitor.peak_source
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    row = next(r for r in rows if r.get("train/device/mfu"))
    flops_per_sec = float(row["train/device/flops_per_sec"])
    assert float(row["train/device/mfu"]) == pytest.approx(flops_per_sec / 1e12)
    # The FLOPs it counts per batch are those torch's counter sees in a training step on a (4, 32) batch.
    meta = meta_model(model.model.config)
    x = torch.randint(0, 128, (4, 32), device="meta")
    counted = measure_flops(meta, lambda: meta(x).logits, loss_fn=lambda y: y.sum())
    per_batch = flops_per_sec / float(row["train/device/batches_per_sec"])
    assert per_batch == pytest.approx(counted, rel=0.02)
    # tokens/s = samples/s x block size
    assert float(row["train/device/items_per_sec"]) == pytest.approx(
        32 * float(row["train/device/samples_per_sec"])
    )


def test_throughput_monitor_prefers_lightnings_table_over_the_config(monkeypatch):
    monkeypatch.setattr("lightning.pytorch.callbacks.throughput_monitor.get_available_flops", lambda *a: 7e14)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.state.stage = RunningStage.TRAINING
    monitor = LMThroughputMonitor(peak_flops=1e12)
    monitor.setup(trainer, CausalLMModule(model_config=TINY), "fit")
    assert monitor.available_flops == 7e14 and "Lightning's table" in monitor.peak_source


def test_gradient_accumulation_gives_the_update_of_the_bigger_batch(tmp_path, bpe_tokenizer_path, doc_texts):
    # Same shuffled order (the sampler's permutation does not depend on the batch size): 2 micro-batches
    # of 4 blocks then one optimizer step == one batch of 8 blocks and one step. No dropout (its random
    # masks depend on the batch shape), and a large AdamW eps so that the first step is proportional to
    # the gradient (with eps ~ 0 it is lr * sign(g), and float noise flips near-zero signs).
    no_dropout = {**TINY, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    kwargs = {"eps": 1.0, "max_steps": 1, "model_config": no_dropout}
    accumulated, _ = _tiny_fit(
        tmp_path / "a", bpe_tokenizer_path, doc_texts, accumulate_grad_batches=2, **kwargs
    )
    big, _ = _tiny_fit(tmp_path / "b", bpe_tokenizer_path, doc_texts, batch_size=8, **kwargs)
    half, _ = _tiny_fit(tmp_path / "c", bpe_tokenizer_path, doc_texts, **kwargs)  # the first 4 blocks only
    pairs = list(
        zip(accumulated.model.parameters(), big.model.parameters(), half.model.parameters(), strict=True)
    )
    assert max((a - b).abs().max().item() for a, b, _ in pairs) < 1e-6
    assert max((a - c).abs().max().item() for a, _, c in pairs) > 1e-4  # the second micro-batch counted
