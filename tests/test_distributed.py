"""DDP on CPU (2 processes, gloo): exact distributed validation, a checkpoint one process loads, sampling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lm_lightning import CausalLMModule


def _config(tmp_path: Path, tokenizer_path: str, doc_texts: list[str]) -> Path:
    (tmp_path / "train.txt").write_text("".join(doc_texts[:20]))  # 50 blocks of 32
    (tmp_path / "valid.txt").write_text("".join(doc_texts[500:512]))  # 22 blocks: not a multiple of 2 x 4
    config = {
        "seed_everything": 3,
        "trainer": {
            "accelerator": "cpu",
            "enable_model_summary": False,
            "enable_progress_bar": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": "ddp"},
            },
        },
        "model": {"model_config": {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 32}},
        "data": {
            "tokenizer": tokenizer_path,
            "data_files": {"train": "train.txt", "validation": "valid.txt"},
            "block_size": 32,
            "batch_size": 4,
            "cache_dir": "cache",
        },
    }
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "lm_lightning", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _perplexity(stdout: str) -> float:
    row = next(line for line in stdout.splitlines() if "val/perplexity" in line)
    return float(row.strip("│ ").split("│")[-1])


@pytest.mark.slow
def test_ddp_fit_then_one_process_loads_and_validation_is_exact(tmp_path, bpe_tokenizer_path, doc_texts):
    config = str(_config(tmp_path, bpe_tokenizer_path, doc_texts))
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
    sampler = [
        "--trainer.callbacks+=lm_lightning.TextGenerationCallback",
        "--trainer.callbacks.prompts=[The]",
        "--trainer.callbacks.decodings=[greedy]",
        "--trainer.callbacks.max_new_tokens=4",
    ]
    # 50 blocks, global batches of 8: 7 steps an epoch (the last of 2 blocks), so step 8 is in the second
    # epoch, after one validation.
    _run(tmp_path, "fit", "--config", config, *ddp, *sampler, "--trainer.max_steps", "8")
    run = tmp_path / "runs" / "ddp" / "version_0"
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 1 and samples[0]["step"] == 7  # rank zero alone sampled, once, and nobody hung
    summary = json.loads((run / "run_summary.json").read_text())  # rank zero drew, no rank hung on log_dir
    assert (run / "curves.png").is_file() and summary["world_size"] == 2 and summary["steps"] == 8
    # Rank 0's real tokens times 2: epoch 0's 6 batches of 4 and its last step's 2 blocks (the rest of that
    # step is padding), then a batch of 4 of epoch 1.
    assert summary["tokens"] == (6 * 4 + 2 + 4) * 32 * 2
    last = run / "checkpoints" / "last.ckpt"
    module = CausalLMModule.load_from_checkpoint(last, map_location="cpu")  # one process, no DDP
    assert module.model.config.n_layer == 2

    no_logger = ["--trainer.logger", "false", "--ckpt_path", str(last)]
    one = _perplexity(_run(tmp_path, "validate", "--config", config, *no_logger).stdout)
    two = _perplexity(_run(tmp_path, "validate", "--config", config, *ddp, *no_logger).stdout)
    print(f"val/perplexity: 1 process {one!r}, 2 processes {two!r}")
    assert one == pytest.approx(two, rel=1e-5)
    assert 1 < one < 1000  # finite; near the vocabulary size (512) after 8 steps at the default lr


@pytest.mark.slow
def test_ddp_trains_lora_adapters_through_the_chunked_loss(tmp_path, bpe_tokenizer, doc_texts):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    eos = bpe_tokenizer.eos_token_id
    config = GPT2Config(vocab_size=512, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=eos,
                        eos_token_id=eos)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    bpe_tokenizer.save_pretrained(tmp_path / "base")
    yaml_path = _config(tmp_path, bpe_tokenizer.name_or_path, doc_texts)
    settings = yaml.safe_load(yaml_path.read_text())
    settings["model"] = {
        "model_name_or_path": str(tmp_path / "base"),
        "lora": {"r": 4},
        "learning_rate": 1e-2,
    }
    del settings["data"]["tokenizer"]  # the model's own
    yaml_path.write_text(yaml.safe_dump(settings))
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.max_steps", "3"]
    _run(tmp_path, "fit", "--config", str(yaml_path), *ddp, "--trainer.limit_val_batches", "0")
    last = tmp_path / "runs" / "ddp" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)["state_dict"]
    assert state and all("lora_" in k for k in state)  # the adapters alone
    assert all(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)  # B left zero: they trained
    module = CausalLMModule.load_from_checkpoint(last, map_location="cpu", weights_only=True)
    assert torch.equal(
        module.model.state_dict()[next(iter(state))[len("model.") :]], next(iter(state.values()))
    )
