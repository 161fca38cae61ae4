"""Data sets of the harness tasks that ship with lm_lightning (``lm_lightning/evaluation/tasks/*.yaml``)."""

from __future__ import annotations

import random
from typing import Any

from datasets import Dataset, DatasetDict

from lm_lightning.data.corpus import python_docs_qa

# Choices are cut at a word boundary: with the question they then fit a context of 256 tokens.
MAX_CHOICE_CHARS = 400
NUM_DISTRACTORS = 3
SEED = 0


def python_docs_mc(**_: Any) -> DatasetDict:
    """One ``test`` split of ``question``, ``choices`` (4 strings) and ``label`` (the right one's index).

    Each question of ``python-docs-qa`` with the opening of its own answer and of 3 answers to other
    questions, in an order drawn from a fixed seed: the same documents on every run of the same Python. The
    harness calls it with the task's metadata, which it does not need.
    """
    pairs = python_docs_qa()
    answers = [_opening(text) for text in pairs["completion"]]
    rng = random.Random(SEED)
    rows = []
    for i, prompt in enumerate(pairs["prompt"]):
        others = sorted({a for a in answers if a != answers[i]})  # distinct texts, none equal to the answer
        choices = rng.sample(others, NUM_DISTRACTORS)
        label = rng.randrange(NUM_DISTRACTORS + 1)
        choices.insert(label, answers[i])
        rows.append({"question": prompt.rstrip(), "choices": choices, "label": label})
    return DatasetDict({"test": Dataset.from_list(rows)})


def _opening(text: str) -> str:
    if len(text) <= MAX_CHOICE_CHARS:
        return text
    return text[:MAX_CHOICE_CHARS].rsplit(None, 1)[0]
