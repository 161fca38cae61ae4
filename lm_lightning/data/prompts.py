"""Reading prompts for ``predict`` from the command line or a file."""

from __future__ import annotations

import json
from pathlib import Path


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a ``.txt`` file (one per non-empty line) or ``.jsonl`` (a ``prompt`` or ``text`` key)."""
    path = Path(path)
    setting = f"prompts_file={str(path)!r}"
    if not path.is_file():
        raise FileNotFoundError(f"{setting}: no such file. Give a .txt or .jsonl file of prompts.")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{setting} is not valid UTF-8 ({err}); convert it to UTF-8.") from err
    if path.suffix.lower() == ".jsonl":
        prompts = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{setting}, line {number}: not JSON ({err}).") from err
            prompt = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"{setting}, line {number}: needs a non-empty 'prompt' (or 'text') string.")
            prompts.append(prompt)
    else:
        prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"{setting} holds no prompts: add one prompt per line.")
    return prompts
