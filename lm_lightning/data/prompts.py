"""Reading prompts for ``predict`` from the command line or a file, and rendering chat prompts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from lm_lightning.data.formats import EndOfTurn, check_messages, end_of_turn, render_chat


def read_prompts(path: str | Path) -> list[str] | list[list[dict[str, Any]]]:
    """Prompts from a ``.txt`` file (one per non-empty line) or ``.jsonl`` (a ``prompt`` or ``text`` key,
    or a ``messages`` list: a chat that the model answers, every line then)."""
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
            if isinstance(record, dict) and "messages" in record:
                prompts.append(_chat_prompt(record["messages"], f"{setting}, line {number}"))
                continue
            prompt = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"{setting}, line {number}: needs a non-empty 'prompt' (or 'text') string.")
            prompts.append(prompt)
    else:
        prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"{setting} holds no prompts: add one prompt per line.")
    if len({isinstance(p, str) for p in prompts}) > 1:
        raise ValueError(f"{setting} mixes 'messages' chats and plain prompts: give one kind per file.")
    return prompts


def _chat_prompt(messages: Any, where: str) -> list[dict[str, Any]]:
    check_messages(messages, where, need_assistant=False)
    if messages[-1]["role"] == "assistant":
        raise ValueError(f"{where}: the chat ends with the assistant's turn; end it with the turn to answer.")
    return messages


def render_chat_prompts(
    tokenizer: PreTrainedTokenizerBase, chats: list[list[dict[str, Any]]], template: str
) -> tuple[list[str], EndOfTurn]:
    """Chats rendered with the generation prompt (the assistant's turn opened), and their end of turn."""
    texts = [
        render_chat(tokenizer, chat, template, f"Chat prompt {i}", add_generation_prompt=True)
        for i, chat in enumerate(chats)
    ]
    return texts, end_of_turn(tokenizer, template)


class ChatPromptBatch:
    """Collates rendered chat prompts for ``predict``: already holding the template's special tokens, they are
    tokenized without adding any, and generation stops at the template's end of turn."""

    def __init__(self, end: EndOfTurn) -> None:
        self.end = end

    def __call__(self, prompts: list[str]) -> dict[str, Any]:
        stops = {"stop_token_ids": self.end.token_ids, "stop_strings": self.end.strings}
        return {"prompts": prompts, "add_special_tokens": False, **stops}
