"""The CLI: fit/validate/test from YAML in a subprocess, overrides, shipped configs, early errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import run_cli
from transformers import GPT2Config, GPT2LMHeadModel

from lm_lightning import CausalLMModule, load_tokenizer
from lm_lightning.cli import cli_main

CONFIGS = Path(__file__).parents[1] / "configs"


def _tiny_config(tmp_path: Path, tokenizer_path: str, doc_texts: list[str]) -> Path:
    train = tmp_path / "train.txt"
    train.write_text("".join(doc_texts[:500]))
    valid = tmp_path / "valid.txt"
    valid.write_text("".join(doc_texts[500:560]))
    config = {
        "seed_everything": 1,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 4,
            "limit_val_batches": 3,
            "val_check_interval": 3,
            "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path / "runs"), "name": "tiny"},
            },
        },
        "model": {
            "model_config": {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64},
            "learning_rate": 1e-3,
        },
        "data": {
            "tokenizer": tokenizer_path,
            "data_files": {"train": str(train), "validation": str(valid), "test": str(valid)},
            "block_size": 64,
            "batch_size": 4,
            "cache_dir": str(tmp_path / "cache"),
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lm_lightning", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_fit_in_a_subprocess_then_validate_test_predict_export(
    tmp_path, bpe_tokenizer_path, doc_texts, monkeypatch, capsys
):
    # fit as a real process (exit code, YAML overrides); the other commands in-process (~10 s of imports each)
    config = _tiny_config(tmp_path, bpe_tokenizer_path, doc_texts)
    fit = _run(
        "fit",
        "--config",
        str(config),
        "--trainer.max_steps",
        "6",
        "--model.weight_decay",
        "0.2",
        cwd=tmp_path,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny" / "version_0"
    ckpts = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert {p.name for p in ckpts} >= {"last.ckpt"} and len(ckpts) == 2  # best val/perplexity + last
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 6 and saved["model"]["weight_decay"] == 0.2  # overrides applied

    module = CausalLMModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert module.hparams.weight_decay == 0.2
    assert module.model.config.vocab_size == 512  # followed the tokenizer

    monkeypatch.chdir(tmp_path)
    last = str(run_dir / "checkpoints" / "last.ckpt")
    for verb, key in (("validate", "val/perplexity"), ("test", "test/perplexity")):
        assert run_cli(monkeypatch, verb, "--config", str(config), "--ckpt_path", last) == 0
        assert key in capsys.readouterr().out

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The for statement\n\nA class definition\nimport os\n")
    out_file = tmp_path / "out" / "predictions.jsonl"
    code = run_cli(
        monkeypatch, "predict", "--config", str(config), "--ckpt_path", str(ckpts[0]),
        "--data.prompts_file", str(prompts),
        "--model.predict_decodings", '[greedy, {preset: top_k_top_p, max_new_tokens: 5}]',
        "--predictions.output_path", str(out_file),
    )  # fmt: skip
    assert code == 0
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    # 3 prompts x (1 greedy + 3 top_k_top_p return sequences)
    assert len(records) == 12 and set(records[0]) == {"prompt", "preset", "index", "text", "num_new_tokens"}
    assert {r["prompt"] for r in records} == {"The for statement", "A class definition", "import os"}
    sampled = [r for r in records if r["preset"] != "greedy"]
    assert len(sampled) == 9 and all(0 < r["num_new_tokens"] <= 5 for r in sampled)
    assert sorted(r["index"] for r in sampled if r["prompt"] == "import os") == [0, 1, 2]

    assert (
        run_cli(monkeypatch, "export", "--ckpt_path", str(ckpts[0]), "--output_dir", str(tmp_path / "hf"))
        == 0
    )
    assert (tmp_path / "hf" / "config.json").exists() and (tmp_path / "hf" / "tokenizer.json").exists()


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(CONFIGS / config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "tokenizer" not in printed["model"]  # a link target: given once, in data
    cli = cli_main(["--config", str(CONFIGS / config)], run=False)  # the FSDP2 recipe too, on a CPU
    assert cli.model.hparams.tokenizer == cli.datamodule.tokenizer_spec


class _Recorder(L.Callback):
    """What the trainer did: the batches' shapes, the learning rate at each step, the validations."""

    def __init__(self) -> None:
        self.shapes: set[tuple[int, ...]] = set()
        self.lrs: list[float] = []
        self.validations = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.shapes.add(tuple(batch["input_ids"].shape))
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validations += 1


def test_reference_recipe_trains_as_the_notebook(tmp_path, bpe_tokenizer_path, doc_texts):
    # The shipped recipe, with the hub's gpt2 and wikitext swapped for a tiny local GPT-2 and local text.
    model_dir = tmp_path / "tiny-gpt2"
    tokenizer = load_tokenizer(bpe_tokenizer_path)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=32, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (tmp_path / "train.txt").write_text("".join(doc_texts[:400]))
    (tmp_path / "valid.txt").write_text("".join(doc_texts[400:500]))
    files = {"train": str(tmp_path / "train.txt"), "validation": str(tmp_path / "valid.txt")}
    cli = cli_main(
        ["--config", str(CONFIGS / "gpt2-wikitext2.yaml"), "--model.model_name_or_path", str(model_dir),
         "--data.tokenizer", str(model_dir), "--data.dataset_name", "null",
         "--data.dataset_config_name", "null", "--data.data_files", json.dumps(files),
         "--data.cache_dir", str(tmp_path / "cache"), "--trainer.logger", "false",
         "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", "cpu",
         "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1"],
        run=False,
    )  # fmt: skip
    recorder = _Recorder()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert recorder.shapes == {(8, 512)}  # batch 8 of 512-token blocks
    assert recorder.validations == 2  # an evaluation after each of the 2 epochs
    # AdamW at 2e-5, decaying linearly to 0 over the 2 x 3 steps, weight decay 0.01 on the weights only.
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.9, 0.999)
    assert recorder.lrs == pytest.approx([2e-5 * (1 - i / 6) for i in range(6)])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    metrics = cli.trainer.callback_metrics
    assert metrics["val/perplexity"] == pytest.approx(torch.exp(metrics["val/loss"]).item(), rel=1e-5)


def _tiny_quickstart(tmp_path: Path) -> Path:
    """The quickstart config at tiny limits: a 1-layer model, 2 steps, 2-token samples, all under tmp_path."""
    config = yaml.safe_load((CONFIGS / "quickstart.yaml").read_text())
    config["trainer"].update(
        max_epochs=1, max_steps=2, limit_train_batches=2, limit_val_batches=1, log_every_n_steps=1
    )
    config["trainer"]["callbacks"][0]["init_args"]["max_new_tokens"] = 2
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    config["model"]["model_config"].update(n_layer=1, n_embd=32, n_head=2)
    config["data"].update(train_tokenizer_vocab_size=300, cache_dir=str(tmp_path / "cache"))
    path = tmp_path / "quickstart.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_quickstart_starts_quietly_and_ends_saying_where_its_results_went(tmp_path):
    config = _tiny_quickstart(tmp_path)
    quiet = _run("fit", "--config", str(config), cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    # stderr: the first run's tokenizing progress bars, and no warning, tip or device line.
    noise = ("warn", "deprecat", "tip:", "gpu available", "tpu available", "seed set", "flops")
    lines = [line for line in quiet.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert [line for line in lines if any(n in line.lower() for n in noise)] == []
    out = quiet.stdout.replace("\r", "\n").splitlines()
    assert out[0].startswith("gpt2 from scratch · ") and "python-docs: " in out[0] and " on cpu (" in out[0]
    assert not any("val_nll" in line or "Training: " in line for line in out)  # no summary, no 0/? bar
    run = Path("runs") / "quickstart" / "version_0"
    assert "fit done: max_steps=2 reached (1 epoch)." in out
    assert any(line.startswith(f"last checkpoint: {run}/checkpoints/last.ckpt (step 2") for line in out)
    assert f"exported model:  {run}/hf_model" in out  # the run's own folder
    assert (tmp_path / run / "hf_model" / "model.safetensors").is_file()
    # --verbose true: Lightning's own lines again, its summary of the model alone.
    verbose = _run("fit", "--config", str(config), "--verbose", "true", cwd=tmp_path)
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    both = verbose.stdout + verbose.stderr
    assert "GPU available" in both and "GPT2LMHeadModel" in both and "TokenNLL" not in both
    assert (tmp_path / "runs" / "quickstart" / "version_1" / "hf_model").is_dir()  # the first one kept
