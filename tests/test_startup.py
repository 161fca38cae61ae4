"""A quick start: ``import lm_lightning`` loads none of the heavy modules, and ``--help`` builds nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = [
    "peft",
    "datasets",
    "pandas",
    "pyarrow",
    "tensorboard",
    "lm_eval",
    "lm_lightning.cli",
    "lm_lightning.model.module",
    "lm_lightning.data.datamodule",
    "lm_lightning.generation.decoding",
    "lm_lightning.generation.warpers",
]


def test_import_loads_no_heavy_module():
    code = f"import json, sys, lm_lightning; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert json.loads(out.stdout.splitlines()[-1]) == []
    # ... and every public name is still there, imported on first use
    code = (
        "import lm_lightning as m; print(json.dumps([n for n in m.__all__ if getattr(m, n, None) is None]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", f"import json; {code}"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert json.loads(out.stdout.splitlines()[-1]) == []


def test_unknown_name_is_an_attribute_error():
    import lm_lightning

    with pytest.raises(AttributeError, match="no attribute 'CausalLM'"):
        lm_lightning.CausalLM  # noqa: B018


def test_fit_help_builds_no_model_and_loads_no_tokenizer(monkeypatch, capsys):
    import transformers

    from lm_lightning.cli import cli_main
    from lm_lightning.data import tokenizer
    from lm_lightning.data.datamodule import CausalLMDataModule
    from lm_lightning.model.module import CausalLMModule

    def refuse(*args, **kwargs):
        raise AssertionError("--help did work it should not")

    for owner, name in [
        (transformers.AutoTokenizer, "from_pretrained"),
        (transformers.AutoModelForCausalLM, "from_pretrained"),
        (transformers.AutoModelForCausalLM, "from_config"),
        (CausalLMModule, "configure_model"),
        (CausalLMModule, "build_config"),
        (CausalLMDataModule, "prepare_data"),
        (CausalLMDataModule, "setup"),
        (tokenizer, "load_tokenizer"),
    ]:
        monkeypatch.setattr(owner, name, refuse)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--help"])
    assert exit_info.value.code == 0
    assert "--trainer.precision" in capsys.readouterr().out
