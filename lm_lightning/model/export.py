"""Hugging Face folders (``save_pretrained`` of the model and its tokenizer) from trained weights.

An export never deletes what it did not write: it goes into a new or empty folder, or replaces the files of
an earlier export of ours (listed in ``EXPORT_RECORD``), or, with ``overwrite``, the model and tokenizer
files of another folder. Every other file in the folder stays.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lm_lightning.errors import RunError
from lm_lightning.io import atomic_path

EXPORT_RECORD = "lm_lightning_export.json"
# The files save_pretrained writes for a model, a PEFT adapter or a tokenizer: what --overwrite replaces.
HF_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    EXPORT_RECORD,
)


def check_export_dir(
    output_dir: str | os.PathLike, overwrite: bool = False, setting: str = "--output_dir"
) -> None:
    """Raise unless an export may write into ``output_dir`` (see the module's docstring); touches nothing."""
    path = Path(output_dir)
    resolved = path.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise RunError(
            f"{setting}={str(output_dir)!r} is the current folder (or one above it): an export goes into a "
            "folder of its own. Give a new folder, e.g. --output_dir hf_model."
        )
    if path.exists() and not path.is_dir():
        raise RunError(f"{setting}={str(output_dir)!r} is a file: give a folder to export into.")
    if overwrite or not path.is_dir() or not any(path.iterdir()) or (path / EXPORT_RECORD).is_file():
        return
    raise RunError(
        f"{setting}={str(output_dir)!r} is a folder that holds other files and no earlier export: nothing "
        "was written. Give a new or empty folder, or add --overwrite true to replace only its model and "
        "tokenizer files (others are kept)."
    )


RUN_EXPORT_NAME = "hf_model"  # the export of a fit with export_dir=true: runs/NAME/version_N/hf_model


def fit_export_dir(export_dir: str | bool | None, log_dir: str | os.PathLike | None) -> Path | None:
    """Where a fit exports: ``export_dir``, or with ``export_dir=True`` the run's own folder (``log_dir``)."""
    if export_dir is True:
        return Path(log_dir or ".") / RUN_EXPORT_NAME
    return Path(export_dir) if export_dir else None


def check_export_owner(export_dir: str | os.PathLike, run: str | os.PathLike | None) -> None:
    """Refuse a fixed ``export_dir`` that holds the export of another run (a second fit would replace it)."""
    record = Path(export_dir) / EXPORT_RECORD
    if not record.is_file():
        return
    try:
        owner = json.loads(record.read_text()).get("run")
    except (ValueError, AttributeError):
        owner = None
    if owner is not None and run is not None and Path(owner).resolve() == Path(run).resolve():
        return  # this run's own export (a resumed fit)
    whose = f"run {owner}" if owner else "another fit"
    raise RunError(
        f"--model.export_dir={str(export_dir)!r} holds the export of {whose}: this fit would replace it, so "
        "nothing was trained. Export into this run's own folder with --model.export_dir true "
        f"(runs/NAME/version_N/{RUN_EXPORT_NAME}), give another folder, or delete {str(export_dir)!r} to "
        "replace that export."
    )


def save_hf_folder(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    run: str | os.PathLike | None = None,
) -> Path:
    """Save ``model`` and ``tokenizer`` into ``output_dir``; other files already there are kept.

    A new (or empty) folder appears complete or not at all. Into an earlier export, each file is replaced
    by a rename of its complete new version, after the earlier export's files are removed. ``run``: the
    fit's log folder, recorded so that another run's fit does not replace this export.
    """
    check_export_dir(output_dir, overwrite)
    output_dir = Path(output_dir)
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        with atomic_path(output_dir, directory=True) as tmp:
            _save(model, tokenizer, tmp, run)
        return output_dir
    # Staged beside the folder (same filesystem, so each file moves in by one rename).
    with tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=f".{output_dir.name}.tmp") as staging:
        written = _save(model, tokenizer, Path(staging), run)
        for old in _our_files(output_dir) - set(written):
            (output_dir / old).unlink(missing_ok=True)
        for name in written:
            os.replace(Path(staging) / name, output_dir / name)
    return output_dir


def _save(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, folder: Path, run: Any = None
) -> list[str]:
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # 'Writing model shards' for one file, at the end of every fit
    try:
        model.save_pretrained(folder)
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file()) + [EXPORT_RECORD]
    record: dict[str, Any] = {"files": names, **({"run": str(run)} if run is not None else {})}
    (folder / EXPORT_RECORD).write_text(json.dumps(record, indent=1))
    return names


def _our_files(folder: Path) -> set[str]:
    """The files an earlier export wrote (its record), and any model or tokenizer file of Hugging Face's."""
    names = {p.name for p in folder.iterdir() if p.is_file()}
    ours = {n for n in names if any(fnmatch.fnmatch(n, pattern) for pattern in HF_FILE_PATTERNS)}
    record = folder / EXPORT_RECORD
    if record.is_file():
        with contextlib.suppress(ValueError, AttributeError):  # a damaged record: the patterns still apply
            ours |= set(json.loads(record.read_text()).get("files", [])) & names
    return ours
