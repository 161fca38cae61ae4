"""Corpora that ship with every Python installation, for offline runs and tests."""

from __future__ import annotations

import os
from pathlib import Path

from datasets import Dataset

BUILTIN_CORPORA = ("python-docs",)


def python_docs_texts() -> list[str]:
    """The Python reference manual's topic pages (``pydoc_data.topics``), one paragraph a row.

    About 465,000 characters of English prose and code from the standard library, so every Python
    installation has it and no network is needed.
    """
    from pydoc_data.topics import topics

    rows: list[str] = []
    for key in sorted(topics):
        for paragraph in topics[key].split("\n\n"):
            if paragraph.strip():
                rows.append(paragraph.rstrip() + "\n")
    return rows


def builtin_corpus(name: str) -> Dataset:
    """A built-in corpus by name, as a one-split ``Dataset`` with a ``text`` column."""
    if name == "python-docs":
        return Dataset.from_dict({"text": python_docs_texts()})
    raise ValueError(f"corpus={name!r} is not a built-in corpus; choose one of {list(BUILTIN_CORPORA)}.")


def shared_data_dir() -> Path:
    """Offline copies of hub data (WikiText-2, the GPT-2 tokenizer) for the tests and benchmarks.

    ``$LM_LIGHTNING_SHARED_DATA``, else ``shared/data`` beside the source checkout (``../shared/data``).
    """
    default = Path(__file__).resolve().parents[3] / "shared" / "data"
    return Path(os.environ.get("LM_LIGHTNING_SHARED_DATA", default))
