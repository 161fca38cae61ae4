"""Where texts come from: hub datasets, local files, built-in corpora or in-memory datasets, as a DatasetDict.

Also the fingerprint of local files that keys the block cache, so a warm start reads no text.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, IterableDataset, Value, load_dataset

from lm_lightning.data.corpus import BUILTIN_CORPORA, builtin_corpus
from lm_lightning.io import remove_empty

# File suffix -> the ``datasets`` builder that reads it.
BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}


@dataclass
class TextSource:
    """Exactly one of a hub dataset, local files, a built-in corpus or an in-memory ``DatasetDict``."""

    dataset_name: str | None = None
    dataset_config_name: str | None = None
    data_files: dict[str, str] | None = None
    corpus: str | None = None
    dataset: DatasetDict | None = None

    def __post_init__(self) -> None:
        sources = {
            "dataset_name": self.dataset_name,
            "data_files": self.data_files,
            "corpus": self.corpus,
            "dataset": self.dataset,
        }
        given = [k for k, v in sources.items() if v is not None]
        if len(given) > 1:
            # Often a config file sets one and the command line another: how to drop either.
            drop = " or ".join(f"--data.{k} null" for k in given if k != "dataset")
            raise ValueError(
                f"Give exactly one data source, got {given}: keep one of --data.dataset_name (hub), "
                "--data.data_files (local files), --data.corpus (built-in: "
                f"{', '.join(BUILTIN_CORPORA)}) or dataset= (an in-memory DatasetDict, from Python), and "
                f"set the others to null ({drop})."
            )
        if self.corpus is not None and self.corpus not in BUILTIN_CORPORA:
            raise ValueError(f"corpus={self.corpus!r} is unknown; built-in corpora: {list(BUILTIN_CORPORA)}.")
        if isinstance(self.dataset, Dataset):
            self.dataset = DatasetDict({"train": self.dataset})
        if isinstance(self.data_files, str):
            self.data_files = {"train": self.data_files}

    @property
    def given(self) -> bool:
        """Whether any source is set (``predict`` runs on prompts alone)."""
        return any(v is not None for v in (self.dataset_name, self.data_files, self.corpus, self.dataset))

    def file_columns(self) -> dict[str, list[str]]:
        """Per split of local data files, its columns as far as known without loading (``peek_columns``)."""
        found = {split: peek_columns(pattern) for split, pattern in (self.data_files or {}).items()}
        return {split: columns for split, columns in found.items() if columns is not None}

    def load(self, streaming: bool = False, files_cache: str | None = None) -> DatasetDict:
        """The source's splits as map-style datasets; with ``streaming``, its ``validation``/``test`` only.

        ``files_cache``: where ``datasets`` keeps its Arrow copy of local data files (default its cache).
        """
        if self.dataset is not None:
            return DatasetDict(self.dataset)
        if self.corpus is not None:
            return DatasetDict({"train": builtin_corpus(self.corpus)})
        if streaming:
            return self._eval_splits(files_cache)
        if self.data_files is not None:
            return load_data_files(self.data_files, files_cache)
        return load_dataset(self.dataset_name, self.dataset_config_name)

    def split_names(self) -> list[str] | None:
        """The source's splits, known without loading it; ``None`` when that needs the hub and fails."""
        if self.dataset is not None:
            return list(self.dataset)
        if self.corpus is not None:
            return ["train"]
        if self.data_files is not None:
            return list(self.data_files)
        from datasets import get_dataset_split_names

        try:
            return list(get_dataset_split_names(self.dataset_name, self.dataset_config_name))
        except Exception:  # offline, or no such dataset: loading it says why
            return None

    def check_split(self, split: str) -> None:
        """Raise when the source has no ``split`` (checked from its description: nothing is loaded)."""
        names = self.split_names()
        if names is not None and split not in names and not (split == "validation" and "train" in names):
            raise ValueError(
                f"The data source has no {split!r} split (its splits are {names}): give one, e.g. "
                f"--data.data_files.{split} FILE, or evaluate another split (validate uses 'validation')."
            )

    def stream_train(self) -> IterableDataset:
        """The train split as a ``datasets.IterableDataset``: read lazily, one shard (file) at a time."""
        if self.data_files is None:
            return load_dataset(self.dataset_name, self.dataset_config_name, split="train", streaming=True)
        pattern = self.data_files["train"]
        builder, kwargs = _builder("train", pattern)
        return load_dataset(builder, data_files={"train": pattern}, split="train", streaming=True, **kwargs)

    def _eval_splits(self, files_cache: str | None) -> DatasetDict:
        if self.data_files is not None:
            if "train" not in self.data_files:
                raise ValueError(f"data_files has no 'train' split; its splits are {list(self.data_files)}.")
            files = {k: v for k, v in self.data_files.items() if k != "train"}
            return load_data_files(files, files_cache) if files else DatasetDict()
        from datasets import get_dataset_split_names

        names = get_dataset_split_names(self.dataset_name, self.dataset_config_name)
        return DatasetDict(
            {
                split: load_dataset(self.dataset_name, self.dataset_config_name, split=split)
                for split in names
                if split in ("validation", "test")
            }
        )

    def files_fingerprint(self) -> dict[str, list] | None:
        """Per split, each local file's absolute path, size and modification time; ``None`` unless all local.

        This is how ``datasets`` fingerprints local data files, so an edited file gives another cache key.
        Patterns matching nothing give ``None`` too: loading the source then raises the clear error.
        """
        if self.data_files is None:
            return None
        files = {}
        for split, pattern in self.data_files.items():
            if "://" in pattern:
                return None
            matches = sorted(glob.glob(os.path.expanduser(pattern)))
            if not matches:
                return None
            stats = [(os.path.abspath(m), os.stat(m)) for m in matches]
            files[split] = [[path, st.st_size, st.st_mtime_ns] for path, st in stats]
        return files


class ScratchFolder:
    """A temporary folder under ``root``, made on first use; ``remove`` deletes it and the folders made
    for it.

    Holds ``datasets``' Arrow copy of local data files, which is needed only until their blocks are cached.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path: Path | None = None
        self._made: list[Path] = []

    def get(self) -> str:
        """The folder (made now if it is not there yet)."""
        if self.path is None:
            self._made = [p for p in (self.root, *self.root.parents) if not p.exists()]
            self.root.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(dir=self.root, prefix="raw-files-"))
        return str(self.path)

    def remove(self) -> None:
        """Delete the folder, and the empty folders made for it (a no-op when it was never made)."""
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            remove_empty([self.path.parent, *self._made])
            self.path = None


def load_data_files(data_files: dict[str, str], cache_dir: str | None = None) -> DatasetDict:
    """Local (or remote) files, a path or glob per split; each split read by the builder of its file type
    (its Arrow copy in ``cache_dir``, default the ``datasets`` cache)."""
    splits = {}
    for split, pattern in data_files.items():
        builder, kwargs = _builder(split, pattern)
        try:
            splits[split] = load_dataset(
                builder, data_files={split: pattern}, split=split, cache_dir=cache_dir, **kwargs
            )
        except Exception as err:
            cause: BaseException | None = err
            while cause is not None:
                if isinstance(cause, UnicodeDecodeError):
                    raise ValueError(
                        f"data_files[{split!r}]={pattern!r}: a file is not valid UTF-8 ({cause}); convert it "
                        "to UTF-8."
                    ) from err
                cause = cause.__cause__ or cause.__context__
            raise
    return DatasetDict(splits)


def _builder(split: str, pattern: str) -> tuple[str, dict[str, Any]]:
    """The ``datasets`` builder and its arguments for ``pattern``'s files, which must exist and hold data."""
    if "://" not in pattern:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise FileNotFoundError(
                f"data_files[{split!r}]={pattern!r}: no such file. Give an existing path or glob."
            )
        for match in matches:
            if os.path.getsize(match) == 0:
                raise ValueError(f"data_files[{split!r}]: {match!r} is empty; give a file with text in it.")
    suffix = Path(pattern.split("::")[0]).suffix.lower()
    if suffix not in BUILDERS:
        raise ValueError(
            f"data_files[{split!r}]={pattern!r}: unsupported file type {suffix!r}; "
            f"use one of {sorted(BUILDERS)}."
        )
    builder = BUILDERS[suffix]
    return builder, {"keep_linebreaks": True} if builder == "text" else {}


def peek_columns(pattern: str) -> list[str] | None:
    """The columns of the first local file matching ``pattern``, from its first row (JSON lines, CSV) or its
    schema (Parquet), read without ``datasets`` (which would write its cache first); ``None`` when unknown."""
    matches = sorted(glob.glob(os.path.expanduser(pattern))) if "://" not in pattern else []
    if not matches:
        return None
    path, suffix = matches[0], Path(matches[0]).suffix.lower()
    try:
        if BUILDERS.get(suffix) == "text":
            return ["text"]
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        with open(path, encoding="utf-8") as file:
            first = next((line for line in file if line.strip()), "")
        if suffix == ".csv":
            return next(csv.reader([first]), None)
        if suffix == ".jsonl" or (suffix == ".json" and first.lstrip().startswith("{")):
            row = json.loads(first)
            return list(row) if isinstance(row, dict) else None
    except (OSError, ValueError):  # unreadable or not one JSON object a line: loading it says why
        return None
    return None


def check_columns(columns: list[str], text_column: str, split: str) -> None:
    """Raise unless ``text_column`` is among a split's ``columns``."""
    if text_column not in columns:
        raise ValueError(
            f"text_column={text_column!r} is not a column of the {split!r} split; its columns are "
            f"{columns}. Set --data.text_column to one of them."
        )


def check_text_column(ds: Dataset, text_column: str, split: str) -> None:
    """Raise unless ``text_column`` is a string column of ``ds``."""
    check_columns(ds.column_names, text_column, split)
    feature = ds.features[text_column]
    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        raise ValueError(
            f"text_column={text_column!r} in the {split!r} split holds {feature}, not text; "
            f"choose a string column among {ds.column_names}."
        )


def hold_out_validation(raw: DatasetDict, percentage: float, seed: int) -> DatasetDict:
    """``raw`` with a ``validation`` split: the source's own, or ``percentage`` of train rows (seeded)."""
    if "validation" not in raw and "train" in raw:
        # keep_in_memory only without cache files: datasets 5.2 then also names an indices cache file
        # for a file-backed split and raises "use either keep_in_memory or indices_cache_file_name".
        held_out = raw["train"].train_test_split(
            test_size=percentage / 100, seed=seed, keep_in_memory=not raw["train"].cache_files
        )
        raw["train"], raw["validation"] = held_out["train"], held_out["test"]
    return DatasetDict({k: raw[k] for k in ("train", "validation", "test") if k in raw})


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able description (cache keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
