"""Nothing lost: export never deletes the user's files, evaluation writes into its run, files follow umask.

One in-process fit (``lm_lightning.cli.main``, what ``python -m lm_lightning`` runs) gives the checkpoint the
other commands use.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
import warnings
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_tiny_config
from datasets import Dataset
from transformers import AutoModelForCausalLM

from lm_lightning import CausalLMDataModule, cli
from lm_lightning.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory, bpe_tokenizer_path, doc_texts):
    """A folder with a tiny config and one finished fit (2 validations), run with umask 022."""
    root = tmp_path_factory.mktemp("run")
    write_tiny_config(
        root, bpe_tokenizer_path, doc_texts, max_steps=6, val_check_interval=3, limit_val_batches=2
    )
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mask = os.umask(0o022)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = run_cli(mp, "fit", "--config", "tiny.yaml")
    finally:
        os.umask(mask)
        mp.undo()
    assert code == 0
    (root / "fit.out").write_text(out.getvalue())
    return root


def test_fit_prints_a_summary_line_per_validation_and_files_follow_the_umask(run):
    last = run / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    assert stat.S_IMODE(last.stat().st_mode) == 0o644  # not mkstemp's 0600: a team folder can read it
    summaries = [line for line in (run / "fit.out").read_text().splitlines() if line.startswith("epoch ")]
    assert len(summaries) == 2, summaries  # after steps 3 and 6
    assert re.fullmatch(
        r"epoch 0: val/perplexity [\d.]+ \(best [\d.]+\) \| \d+ s \| [\d,]+ real tok/s", summaries[0]
    )
    first, second = (float(line.split()[3]) for line in summaries)
    assert f"(best {min(first, second):.1f})" in summaries[1]


def test_export_never_deletes_what_it_did_not_write(run, monkeypatch, capsys):
    monkeypatch.chdir(run)
    ckpt = "runs/tiny/version_0/checkpoints/last.ckpt"
    theirs = run / "theirs"
    (theirs / "sub").mkdir(parents=True)
    (theirs / "notes.txt").write_text("mine")
    (theirs / "sub" / "keep.py").write_text("print('mine')")
    assert run_cli(monkeypatch, "export", "--ckpt_path", ckpt, "--output_dir", "theirs") == 2
    assert "holds other files and no earlier export: nothing was written" in capsys.readouterr().err
    assert sorted(p.name for p in theirs.rglob("*")) == ["keep.py", "notes.txt", "sub"]

    assert run_cli(monkeypatch, "export", "--ckpt_path", ckpt, "--output_dir", ".") == 2
    assert "is the current folder" in capsys.readouterr().err

    # --overwrite: the model and tokenizer files go in, the user's files stay.
    assert (
        run_cli(monkeypatch, "export", "--ckpt_path", ckpt, "--output_dir", "theirs", "--overwrite", "true")
        == 0
    )
    assert (theirs / "notes.txt").read_text() == "mine" and (theirs / "sub" / "keep.py").exists()
    assert (theirs / "model.safetensors").exists() and (theirs / "tokenizer.json").exists()

    # A fresh folder appears whole, with the umask's permissions; exporting again into it needs no flag.
    mask = os.umask(0o022)
    try:
        assert run_cli(monkeypatch, "export", "--ckpt_path", ckpt, "--output_dir", "fresh") == 0
    finally:
        os.umask(mask)
    assert stat.S_IMODE((run / "fresh").stat().st_mode) == 0o755
    (run / "fresh" / "README.md").write_text("my notes on this model")
    assert run_cli(monkeypatch, "export", "--ckpt_path", ckpt, "--output_dir", "fresh") == 0
    assert (run / "fresh" / "README.md").read_text() == "my notes on this model"
    exported = AutoModelForCausalLM.from_pretrained(run / "fresh")
    weights = torch.load(run / ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(exported.transformer.wte.weight, weights["model.transformer.wte.weight"])


def test_evaluation_writes_into_the_run_it_evaluates(run, monkeypatch, capsys):
    monkeypatch.chdir(run)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_cli(monkeypatch, "validate", "--config", "tiny.yaml", "--ckpt_path", "last") == 0
        code = run_cli(
            monkeypatch, "predict", "--config", "tiny.yaml", "--ckpt_path", "last", "--data.prompts", "[The]"
        )
        assert code == 0
    noise = ("dirpath has changed", "callbacks used to create the checkpoint need to be provided")
    assert not [str(w.message) for w in caught if any(n in str(w.message) for n in noise)]
    versions = sorted(p.name for p in (run / "runs" / "tiny").iterdir())
    assert versions == ["version_0"]  # no version_N per evaluation
    run_dir = run / "runs" / "tiny" / "version_0"
    assert any((run_dir / "validate" / "version_0").glob("events.out.tfevents.*"))
    predictions = run_dir / "predict" / "predictions.jsonl"
    assert predictions.exists()
    lines = capsys.readouterr().out.splitlines()
    assert f"Wrote predictions to {predictions.relative_to(run)}" in lines  # a line of its own


def test_the_command_and_its_help_list_every_subcommand(capsys):
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "lm-lightning"]
    assert script.load() is cli.main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m lm_lightning {fit,validate,test,predict,export,report")
    described = [
        line.split(maxsplit=1) for line in out.splitlines() if line.startswith("  ") and "  " in line[2:]
    ]
    commands = {words[0]: words[1] for words in described if words[0] in cli.SUBCOMMANDS}
    assert set(commands) == set(cli.SUBCOMMANDS)
    assert all(text.rstrip().endswith(".") for text in commands.values())  # whole sentences


def test_splits_of_different_file_types_load(tmp_path, bpe_tokenizer_path, doc_texts):
    Dataset.from_dict({"text": doc_texts[:80]}).to_json(tmp_path / "train.jsonl")
    Dataset.from_dict({"text": doc_texts[500:540]}).to_parquet(tmp_path / "valid.parquet")
    dm = CausalLMDataModule(
        tokenizer=bpe_tokenizer_path,
        data_files={"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "valid.parquet")},
        block_size=32,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.datasets["train"]) > 0 and len(dm.datasets["validation"]) > 0
    assert Path(dm.cache_path).is_dir()
