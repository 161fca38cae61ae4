"""Checkpoints that travel: the config and tokenizer inside, no hub, no tokenizer folder, no base weights."""

from __future__ import annotations

import json
import shutil
import sys

import huggingface_hub.constants
import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from lm_lightning import CausalLMModule, cli_main
from lm_lightning.__main__ import main as entry_point
from lm_lightning.data.tokenizer import tokenizer_from_data, tokenizer_to_data


def test_tokenizer_as_data_gives_the_same_ids(bpe_tokenizer):
    bpe_tokenizer.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<|user|>"]})
    bpe_tokenizer.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
    bpe_tokenizer.padding_side = "left"
    data = tokenizer_to_data(bpe_tokenizer)
    assert json.loads(json.dumps(data)) == data  # plain data: weights_only loading accepts it
    rebuilt = tokenizer_from_data(data)
    texts = ["def f(x):\n    return x  # ünïcödé", "<|user|>hi<pad>", "a"]
    assert rebuilt(texts, padding=True).input_ids == bpe_tokenizer(texts, padding=True).input_ids
    assert (
        rebuilt.padding_side == "left" and rebuilt.pad_token == "<pad>" and len(rebuilt) == len(bpe_tokenizer)
    )
    messages = [{"role": "user", "content": "hello"}]
    assert rebuilt.apply_chat_template(messages, tokenize=False) == "<|user|>hello"


def _config(tmp_path, base: str, doc_texts) -> str:
    (tmp_path / "train.txt").write_text("".join(doc_texts[:150]))
    (tmp_path / "valid.txt").write_text("".join(doc_texts[150:170]))
    config = {
        "seed_everything": 1,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 3,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path / "runs"), "name": "travel"},
            },
        },
        # No tokenizer anywhere: the model's own, from its pretrained folder.
        "model": {"model_name_or_path": base, "learning_rate": 3e-3, "predict_decodings": ["greedy"]},
        "data": {
            "data_files": {"train": str(tmp_path / "train.txt"), "validation": str(tmp_path / "valid.txt")},
            "block_size": 32,
            "batch_size": 4,
            "cache_dir": str(tmp_path / "cache"),
            "prompts": ["The for statement", "A class"],
        },
    }
    path = tmp_path / "travel.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _validate_and_predict(config: str, ckpt: str, out: str) -> tuple[float, list[dict]]:
    cli = cli_main(["validate", "--config", config, "--ckpt_path", ckpt])
    perplexity = cli.trainer.callback_metrics["val/perplexity"].item()
    cli_main(["predict", "--config", config, "--ckpt_path", ckpt, "--predictions.output_path", out])
    with open(out) as file:
        return perplexity, [json.loads(line) for line in file]


def test_checkpoint_travels_without_hub_tokenizer_folder_base_weights_or_cache(
    tmp_path, bpe_tokenizer, doc_texts, monkeypatch
):
    torch.manual_seed(0)
    base = tmp_path / "base"
    config = AutoConfig.for_model(
        "llama", vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    bpe_tokenizer.save_pretrained(base)
    yaml_path = _config(tmp_path, str(base), doc_texts)
    cli_main(["fit", "--config", yaml_path])
    ckpt = tmp_path / "runs" / "travel" / "version_0" / "checkpoints" / "last.ckpt"
    trained = CausalLMModule.load_from_checkpoint(ckpt, weights_only=True).eval()
    ids = torch.tensor([bpe_tokenizer("The for statement").input_ids])
    with torch.no_grad():
        logits = trained.model(input_ids=ids).logits
    before = _validate_and_predict(yaml_path, str(ckpt), str(tmp_path / "before.jsonl"))

    # Elsewhere: the checkpoint alone, offline; the base model, its tokenizer and the data cache are gone.
    moved = tmp_path / "elsewhere" / "model.ckpt"
    moved.parent.mkdir()
    shutil.copy(ckpt, moved)
    shutil.rmtree(tmp_path / "runs")
    shutil.rmtree(base)
    shutil.rmtree(tmp_path / "cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    after = _validate_and_predict(yaml_path, str(moved), str(tmp_path / "after.jsonl"))
    assert after == before  # the same perplexity and the same greedy continuations
    assert len(after[1]) == 2 and all(r["num_new_tokens"] > 0 for r in after[1])

    monkeypatch.setattr(sys, "argv", ["lm_lightning", "export", "--ckpt_path", str(moved), "--output_dir",
                                      str(tmp_path / "hf")])  # fmt: skip
    entry_point()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids).logits, logits)
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_training_from_scratch_without_a_tokenizer_says_how_to_get_one(tmp_path, doc_texts, capsys):
    (tmp_path / "train.txt").write_text("".join(doc_texts[:20]))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(
            ["fit", "--model.model_config", "{n_layer: 1}", "--data.data_files", str(tmp_path / "train.txt"),
             "--trainer.accelerator", "cpu", "--data.cache_dir", str(tmp_path / "cache")]
        )  # fmt: skip
    assert exit_info.value.code == 2
    assert "No tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "family", ["gpt2", "llama", "qwen3", "mistral", "gpt_neox", "opt", "phi3", "gemma2", "mixtral"]
)
def test_every_family_is_rebuilt_from_its_checkpoint_alone(family, tmp_path, bpe_tokenizer):
    import io

    from test_families import tiny_config

    from lm_lightning.model.portable import add_portable_parts, model_from_checkpoint, portable_parts

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}
    add_portable_parts(checkpoint, model.config, bpe_tokenizer)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # plain data and tensors only
    config, tokenizer = portable_parts(loaded)
    rebuilt = model_from_checkpoint(config, loaded).eval()
    ids = torch.tensor([tokenizer("def f(x): return x").input_ids])
    with torch.no_grad():
        assert torch.equal(rebuilt(input_ids=ids).logits, model(input_ids=ids).logits)
