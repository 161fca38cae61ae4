"""Corpora that ship with every Python installation, for offline runs and tests."""

from __future__ import annotations

import os
import re
from pathlib import Path

from datasets import Dataset

BUILTIN_CORPORA = ("python-docs", "python-docs-qa", "python-docs-pairs")
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


_MARKUP = (
    (re.compile(r'"([^"\n]{1,80})"'), r"\1"),  # "for", "__enter__()": code names in double quotes
    (re.compile(r"\*{1,2}([^*\n]{1,80})\*{1,2}"), r"\1"),  # *emphasis*, **strong**
    (re.compile(r"^\* "), ""),  # list bullets
    (re.compile(r"\s+"), " "),  # the manual's hard line breaks and double spaces
)


def _is_prose(paragraph: str) -> bool:
    """Not code or a grammar rule (indented), a table, a heading, or a signature line."""
    lines = paragraph.strip("\n").split("\n")
    if paragraph.startswith(" ") or any(line.lstrip().startswith(("+-", "+=", "|")) for line in lines):
        return False
    if "::=" in paragraph or (len(lines) == 2 and _HEADING_RULE.fullmatch(lines[1])):
        return False
    return len(paragraph.split()) >= 5


def python_docs_prose() -> list[str]:
    """The prose of the reference manual's topic pages, one paragraph a row, as plain sentences: tables,
    code, grammar rules and headings left out, the quotes and asterisks of its markup removed, each
    paragraph on one line. About 230,000 characters; the built-in ``python-docs`` corpus.
    """
    from pydoc_data.topics import topics

    rows: list[str] = []
    for key in sorted(topics):
        for paragraph in topics[key].split("\n\n"):
            if _is_prose(paragraph):
                text = paragraph.strip()
                for pattern, replacement in _MARKUP:
                    text = pattern.sub(replacement, text)
                rows.append(text + "\n")
    return rows


def _sections() -> dict[str, tuple[str, str | None]]:
    """Per distinct section heading of the manual: the first paragraph of prose after it, and the paragraph of
    prose after that one within the section (``None`` when the section has no other)."""
    from pydoc_data.topics import topics

    def is_heading(paragraph: str) -> bool:
        lines = paragraph.strip("\n").split("\n")
        return len(lines) == 2 and bool(_HEADING_RULE.fullmatch(lines[1])) and len(lines[1]) == len(lines[0])

    sections: dict[str, tuple[str, str | None]] = {}
    for key in sorted(topics):
        paragraphs = topics[key].split("\n\n")
        for i, paragraph in enumerate(paragraphs):
            title = paragraph.strip("\n").split("\n")[0]
            if not is_heading(paragraph) or title in sections:
                continue
            # The first paragraph after the heading that is prose (code and grammar rules are indented).
            answer = next((p for p in paragraphs[i + 1 :] if p.strip() and not p.startswith(" ")), None)
            if answer is None:
                continue
            end = next(
                (j for j in range(i + 1, len(paragraphs)) if is_heading(paragraphs[j])), len(paragraphs)
            )
            prose = [p.strip() for p in paragraphs[i + 1 : end] if p.strip() and not p.startswith(" ")]
            sections[title] = (
                answer.strip(),
                prose[1] if prose[:1] == [answer.strip()] and prose[1:] else None,
            )
    return sections


def _question(title: str) -> str:
    return f"Explain {title[0].lower() + title[1:] if title.startswith('The ') else title}.\n"


def python_docs_qa() -> dict[str, list[str]]:
    """Prompt-completion pairs from the same manual: ``Explain the "for" statement.`` -> the first paragraph
    of prose under that heading, one pair per distinct section heading (170)."""
    sections = _sections()
    return {"prompt": [_question(t) for t in sections], "completion": [a for a, _ in sections.values()]}


def python_docs_pairs() -> dict[str, list[str]]:
    """Preference pairs from the ``python-docs-qa`` questions (170): ``chosen`` is the question's own
    paragraph, ``rejected`` a paragraph of another question's section: the one after that question's answer
    (question ``i`` takes that of the section half the list away, among the sections that have one).

    No paragraph is chosen in one pair and rejected in another. With ``rejected`` the answer of another
    question, every answer is both, and training on some pairs pushes the answers of the held-out ones the
    wrong way (the held-out reward accuracy then falls: see the README).
    """
    sections = _sections()
    answers = [a for a, _ in sections.values()]
    others = [second for _, second in sections.values() if second is not None and second not in answers]
    return {
        "prompt": [_question(t) for t in sections],
        "chosen": answers,
        "rejected": [others[(i + len(others) // 2) % len(others)] for i in range(len(sections))],
    }


def builtin_corpus(name: str) -> Dataset:
    """A built-in corpus by name, as a one-split ``Dataset``: ``text``; ``prompt`` and ``completion``; or
    ``prompt``, ``chosen`` and ``rejected``."""
    if name == "python-docs":
        return Dataset.from_dict({"text": python_docs_prose()})
    if name == "python-docs-qa":
        return Dataset.from_dict(python_docs_qa())
    if name == "python-docs-pairs":
        return Dataset.from_dict(python_docs_pairs())
    raise ValueError(f"corpus={name!r} is not a built-in corpus; choose one of {list(BUILTIN_CORPORA)}.")


def shared_data_dir() -> Path:
    """Offline copies of hub data (WikiText-2, the GPT-2 tokenizer) for the tests and benchmarks.

    ``$LM_LIGHTNING_SHARED_DATA``, else ``shared/data`` beside the source checkout (``../shared/data``).
    """
    default = Path(__file__).resolve().parents[3] / "shared" / "data"
    return Path(os.environ.get("LM_LIGHTNING_SHARED_DATA", default))
