"""Corpora that ship with every Python installation, for offline runs and tests."""

from __future__ import annotations

import os
import re
from pathlib import Path

from datasets import Dataset

BUILTIN_CORPORA = ("python-docs", "python-docs-qa")
_HEADING_RULE = re.compile(r"([*=\-~^])\1+")


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


def python_docs_qa() -> dict[str, list[str]]:
    """Prompt-completion pairs from the same manual: ``Explain the "for" statement.`` -> the first paragraph
    of prose under that heading, one pair per distinct section heading (170)."""
    from pydoc_data.topics import topics

    pairs: dict[str, str] = {}
    for key in sorted(topics):
        paragraphs = topics[key].split("\n\n")
        for i, paragraph in enumerate(paragraphs):
            lines = paragraph.strip("\n").split("\n")
            is_heading = (
                len(lines) == 2 and _HEADING_RULE.fullmatch(lines[1]) and len(lines[1]) == len(lines[0])
            )
            # The first paragraph after the heading that is prose (code and grammar rules are indented).
            prose = (p for p in paragraphs[i + 1 :] if p.strip() and not p.startswith(" "))
            if is_heading and lines[0] not in pairs and (answer := next(prose, None)) is not None:
                pairs[lines[0]] = answer.strip()
    titles = list(pairs)
    return {
        "prompt": [f"Explain {t[0].lower() + t[1:] if t.startswith('The ') else t}.\n" for t in titles],
        "completion": [pairs[t] for t in titles],
    }


def builtin_corpus(name: str) -> Dataset:
    """A built-in corpus by name, as a one-split ``Dataset``: ``text``, or ``prompt`` and ``completion``."""
    if name == "python-docs":
        return Dataset.from_dict({"text": python_docs_texts()})
    if name == "python-docs-qa":
        return Dataset.from_dict(python_docs_qa())
    raise ValueError(f"corpus={name!r} is not a built-in corpus; choose one of {list(BUILTIN_CORPORA)}.")


def shared_data_dir() -> Path:
    """Offline copies of hub data (WikiText-2, the GPT-2 tokenizer) for the tests and benchmarks.

    ``$LM_LIGHTNING_SHARED_DATA``, else ``shared/data`` beside the source checkout (``../shared/data``).
    """
    default = Path(__file__).resolve().parents[3] / "shared" / "data"
    return Path(os.environ.get("LM_LIGHTNING_SHARED_DATA", default))
