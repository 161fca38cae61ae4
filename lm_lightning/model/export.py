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


def save_hf_folder(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
) -> Path:
    """Save ``model`` and ``tokenizer`` into ``output_dir``; other files already there are kept.

    A new (or empty) folder appears complete or not at all. Into an earlier export, each file is replaced
    by a rename of its complete new version, after the earlier export's files are removed.
    """
    check_export_dir(output_dir, overwrite)
    output_dir = Path(output_dir)
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        with atomic_path(output_dir, directory=True) as tmp:
            _save(model, tokenizer, tmp)
        return output_dir
    # Staged beside the folder (same filesystem, so each file moves in by one rename).
    with tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=f".{output_dir.name}.tmp") as staging:
        written = _save(model, tokenizer, Path(staging))
        for old in _our_files(output_dir) - set(written):
            (output_dir / old).unlink(missing_ok=True)
        for name in written:
            os.replace(Path(staging) / name, output_dir / name)
    return output_dir


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, folder: Path) -> list[str]:
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file()) + [EXPORT_RECORD]
    (folder / EXPORT_RECORD).write_text(json.dumps({"files": names}, indent=1))
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
