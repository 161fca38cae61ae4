"""Fine-tuning data formats: which one a dataset is, and each example as ``input_ids`` and ``labels``.

As trl's ``SFTTrainer`` reads them:

- ``text``: a text column, for language modelling (packed into blocks by ``lm_lightning.data.packing``);
- ``prompt_completion``: ``prompt`` and ``completion`` strings, tokenized apart and concatenated, EOS after
  the completion; the loss on the completion (and its EOS) only, unless ``completion_only_loss`` is off;
- ``chat``: a ``messages`` list of ``{role, content}`` dicts, rendered by the tokenizer's chat template (or
  one read from a file); the loss on the assistant turns only, unless ``completion_only_loss`` is off;
- ``preference``: ``chosen`` and ``rejected`` (with or without a ``prompt``), texts or chats, for DPO
  (``lm_lightning.data.preference``).

Each bad row raises a ``ValueError`` that names its split and row.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from datasets import Dataset, DatasetDict, Json
from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from lm_lightning.data.sources import check_columns, check_text_column

IGNORE_INDEX = -100
DataFormat = Literal["auto", "text", "prompt_completion", "chat", "preference"]
FORMATS = ("auto", "text", "prompt_completion", "chat", "preference")
ROLES = ("system", "user", "assistant", "tool")
# The source row of each example, added before a validation split is held out, so errors name the row.
ROW_COLUMN = "__row__"
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
NO_TARGET = 2**31 - 1  # ``first_target`` of an example with no target token
_SENTINEL = "\x00END-OF-TURN-PROBE\x00"

log = logging.getLogger(__name__)


def row_name(split: str, row: int) -> str:
    """How an error names a row of the source: ``The 'train' split, row 3 (counting from 0)``."""
    return f"The {split!r} split, row {row} (counting from 0)"


def detect_format(columns: list[str], text_column: str, data_format: str, split: str) -> str:
    """The format of a split with these columns, as trl detects it, or ``data_format`` when not ``auto``."""
    if data_format not in FORMATS:
        raise ValueError(f"format={data_format!r} is unknown; choose one of {list(FORMATS)}.")
    needs = {
        "text": [text_column],
        "prompt_completion": ["prompt", "completion"],
        "chat": ["messages"],
        "preference": ["chosen", "rejected"],
    }
    if data_format != "auto":
        missing = [c for c in needs[data_format] if c not in columns]
        if missing:
            raise ValueError(
                f"format={data_format!r} needs the column(s) {missing}, missing from the {split!r} split "
                f"(its columns are {columns}): give them, or set --data.format to match the data."
            )
        return data_format
    if "messages" in columns:
        return "chat"
    if "chosen" in columns or "rejected" in columns:
        if "chosen" not in columns or "rejected" not in columns:
            found, missing = ("chosen", "rejected") if "chosen" in columns else ("rejected", "chosen")
            raise ValueError(
                f"The {split!r} split has a {found!r} column but no {missing!r} column (its columns are "
                f"{columns}): preference data needs both."
            )
        return "preference"
    if "prompt" in columns or "completion" in columns:
        if "prompt" not in columns or "completion" not in columns:
            found, missing = ("prompt", "completion") if "prompt" in columns else ("completion", "prompt")
            raise ValueError(
                f"The {split!r} split has a {found!r} column but no {missing!r} column (its columns are "
                f"{columns}): prompt-completion data needs both."
            )
        return "prompt_completion"
    return "text"  # a missing text column gets check_text_column's error, which lists the columns


def check_format_settings(
    data_format: str,
    streaming: bool,
    eos_between_texts: bool,
    document_masking: bool,
    eval_stride: int | None,
    block_size: int | None,
) -> None:
    """Refuse settings that cannot go together, before any data is read."""
    if data_format not in FORMATS:
        raise ValueError(f"format={data_format!r} is unknown; choose one of {list(FORMATS)}.")
    if streaming and data_format not in ("auto", "text"):
        raise ValueError(
            f"streaming=True works on text data, not format={data_format!r}: set --data.streaming false "
            "(fine-tuning sets are small enough to cache whole)."
        )
    if document_masking and not eos_between_texts:
        raise ValueError(
            "document_masking=True finds the texts by the EOS token after each: set "
            "--data.eos_between_texts true."
        )
    if streaming and document_masking:
        raise ValueError(
            "document_masking=True with streaming=True is not supported: a streamed block's targets depend "
            "on where its texts end, and each process packs its own shards, so an optimizer step's number of "
            "targets is not known before the step and the loss could not be weighted exactly across "
            "micro-batches and processes. Set --data.streaming false (the corpus is cached) or "
            "--data.document_masking false."
        )
    if eval_stride is not None and (eval_stride < 1 or (block_size is not None and eval_stride > block_size)):
        raise ValueError(
            f"eval_stride={eval_stride} must be in [1, block_size]: a larger stride skips tokens."
        )
    if eval_stride is not None and document_masking:
        raise ValueError(
            "eval_stride and document_masking=True are two different evaluations: sliding windows across "
            "texts, or each text on its own; set one."
        )


def check_text_only(
    data_format: str, streaming: bool, document_masking: bool, eval_stride: int | None
) -> None:
    """Refuse settings for text data on fine-tuning examples."""
    given = [
        name
        for name, value in (
            ("--data.streaming true", streaming),
            ("--data.document_masking true", document_masking),
            ("--data.eval_stride", eval_stride),
        )
        if value
    ]
    if data_format != "text" and given:
        raise ValueError(
            f"{given[0]} works on text data; this is {data_format!r} data: unset it (fine-tuning sets are "
            "cached whole, their examples kept apart and scored on their own)."
        )


def check_streamed_format(texts: Any, text_column: str, data_format: str) -> None:
    """Refuse a streamed train split that is not text (streaming packs text only)."""
    columns = getattr(texts, "column_names", None)
    if columns is not None and (found := detect_format(columns, text_column, data_format, "train")) != "text":
        raise ValueError(
            f"streaming=True works on text data; the streamed 'train' split is {found!r} data: set "
            "--data.streaming false (fine-tuning sets are small enough to cache whole)."
        )


def resolve_format(raw: DatasetDict, text_column: str, data_format: str, skip_empty: bool = False) -> str:
    """The one format of every split of ``raw`` (text columns checked to hold strings: a null value raises,
    naming its row, unless ``skip_empty``)."""
    found = {
        split: detect_format(ds.column_names, text_column, data_format, split) for split, ds in raw.items()
    }
    if len(set(found.values())) > 1:
        raise ValueError(f"The splits have different formats {found}: give every split the same columns.")
    data_format = next(iter(found.values()), "text" if data_format == "auto" else data_format)
    if data_format == "text":
        for split, ds in raw.items():
            if not isinstance(ds.features.get(text_column), Json):  # Json: mixed types, checked by value
                check_text_column(ds, text_column, split)
            check_text_values(ds, text_column, split, skip_empty)
    return data_format


def check_file_columns(columns: dict[str, list[str]], text_column: str, data_format: str) -> None:
    """Raise when a split's ``columns`` (peeked from its file: ``TextSource.file_columns``) lack what the
    format needs, before ``datasets`` reads the files (and writes its copy of them)."""
    for split, names in columns.items():
        if detect_format(names, text_column, data_format, split) == "text":
            check_columns(names, text_column, split)


def check_text_values(ds: Dataset, text_column: str, split: str, skip_empty: bool) -> int:
    """How many values of the text column are null or not strings; unless ``skip_empty``, the first of them
    raises, naming its row. Before any tokenizing: null values are counted from Arrow's validity bitmaps."""
    if isinstance(ds.features[text_column], Json):  # values of several types (a JSON file's numbers...)
        bad = [i for i, text in enumerate(ds[text_column]) if not isinstance(text, str)]
    else:
        column = ds.with_format("arrow")[text_column]
        nulls = column.is_null().to_numpy(zero_copy_only=False) if column.null_count else []
        bad = [int(i) for i in np.flatnonzero(nulls)]
    if bad and not skip_empty:
        value = ds[bad[0]][text_column]
        shown = "null" if value is None else f"{value!r:.40} ({type(value).__name__})"
        raise ValueError(
            f"{row_name(split, bad[0])}: text_column={text_column!r} holds {shown}, not a string; "
            f"{len(bad)} such row(s) in the split. Fix the data, or set --data.skip_empty true to skip them."
        )
    if bad:
        log.warning(
            f"{split}: {len(bad)} row(s) whose {text_column!r} is null or not a string skipped "
            "(--data.skip_empty)."
        )
    return len(bad)


def read_chat_template(path: str | None) -> str | None:
    """A Jinja chat template from a file (``--data.chat_template``), or ``None``."""
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"chat_template={path!r}: no such file. Give a file holding a Jinja chat template."
        )
    template = file.read_text(encoding="utf-8")
    if not template.strip():
        raise ValueError(f"chat_template={path!r} is empty: give a file holding a Jinja chat template.")
    return template


def chat_template_of(tokenizer: PreTrainedTokenizerBase, template: str | None) -> str:
    """``template``, else the tokenizer's own chat template; an error that says how to give one."""
    template = template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(
            f"Chat data needs a chat template, and the tokenizer {tokenizer.name_or_path!r} has none: give a "
            "Jinja template file with --data.chat_template FILE (or use a tokenizer that has one)."
        )
    return template


def encode_prompt_completion(
    tokenizer: PreTrainedTokenizerBase, prompt: Any, completion: Any, completion_only_loss: bool, where: str
) -> tuple[list[int], list[int]]:
    """``tokenizer(prompt)`` (with its special tokens, e.g. BOS) + ``tokenizer(completion)`` (none) + EOS."""
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: 'prompt' must be a string, got {type(prompt).__name__}.")
    if not isinstance(completion, str) or not completion.strip():
        raise ValueError(f"{where}: the completion is empty ({completion!r}): there is nothing to train on.")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("Prompt-completion data needs a tokenizer with an EOS token; this one has none.")
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True).input_ids)
    completion_ids = list(tokenizer(completion, add_special_tokens=False).input_ids)
    if completion_ids[-1:] != [eos]:
        completion_ids.append(eos)
    prompt_labels = [IGNORE_INDEX] * len(prompt_ids) if completion_only_loss else prompt_ids
    return prompt_ids + completion_ids, prompt_labels + completion_ids


def check_messages(messages: Any, where: str, need_assistant: bool = True) -> None:
    """Raise unless ``messages`` is a non-empty list of ``{role, content}`` dicts with known roles."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(
            f"{where}: 'messages' must be a non-empty list of {{role, content}} dicts, got {messages!r:.80}."
        )
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") is None or message.get("content") is None:
            raise ValueError(
                f"{where}: message {j} must be a dict with 'role' and 'content', got {message!r:.80}."
            )
        if message["role"] not in ROLES:
            raise ValueError(
                f"{where}: message {j} has the unknown role {message['role']!r}; known roles: {list(ROLES)}."
            )
        if not isinstance(message["content"], str):
            raise ValueError(
                f"{where}: message {j}'s content must be a string, got {type(message['content']).__name__}."
            )
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: the chat has no assistant turn, so there is nothing to train on.")


def render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], template: str, where: str, **kwargs: Any
) -> str:
    """The chat rendered by ``template`` as a string (as ``apply_chat_template`` renders it, which refuses
    an empty chat: the generation prompt alone is needed before a first assistant turn); a template error
    names the row."""
    try:
        rendered, _ = render_jinja_template(
            conversations=[messages], chat_template=template, **tokenizer.special_tokens_map, **kwargs
        )
        return rendered[0]
    except Exception as err:  # jinja2's TemplateError, UndefinedError, TemplateSyntaxError, ...
        raise ValueError(f"{where}: the chat template does not render: {type(err).__name__}: {err}") from err


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Any,
    template: str,
    completion_only_loss: bool,
    where: str,
    first_trained: int = 0,
) -> tuple[list[int], list[int]]:
    """A chat's token ids and labels: -100 outside the assistant turns (with ``completion_only_loss``), and
    outside those from message ``first_trained`` on (a preference pair's answers after the shared chat).

    A template with ``{% generation %}`` markers gives the assistant mask itself (transformers'
    ``return_assistant_tokens_mask``). Without markers, which most templates lack, an assistant turn is the
    text between the render of the messages before it (with the generation prompt) and the render through
    it, trailing whitespace excluded; the tokens of the whole render that overlap those characters are
    the assistant's. Written here because transformers only supports the marked templates.
    """
    check_messages(messages, where)
    if _GENERATION_MARKER.search(template):
        try:
            out = tokenizer.apply_chat_template(
                messages, chat_template=template, return_dict=True, return_assistant_tokens_mask=True
            )
        except Exception as err:
            raise ValueError(
                f"{where}: the chat template does not render: {type(err).__name__}: {err}"
            ) from err
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        if first_trained:  # the tokens of the chat before that message, with the generation prompt
            before = render_chat(
                tokenizer, messages[:first_trained], template, where, add_generation_prompt=True
            )
            before_ids = list(tokenizer(before, add_special_tokens=False).input_ids)
            if ids[: len(before_ids)] != before_ids:
                raise ValueError(
                    f"{where}: the chat template renders the shared conversation differently depending on "
                    "what follows it, so the answer's tokens cannot be found."
                )
            mask = [0] * len(before_ids) + mask[len(before_ids) :]
    else:
        text = render_chat(tokenizer, messages, template, where)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or i < first_trained:
                continue
            before = render_chat(tokenizer, messages[:i], template, where, add_generation_prompt=True)
            through = render_chat(tokenizer, messages[: i + 1], template, where)
            if not (through.startswith(before) and text.startswith(through)):
                raise ValueError(
                    f"{where}: the chat template renders message {i} differently depending on what follows "
                    "it, so its tokens cannot be found: mark the assistant content in the template with "
                    "{% generation %}...{% endgeneration %}."
                )
            spans.append((len(before), len(through.rstrip())))
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        mask = [int(any(s < e and t > b for b, e in spans)) for s, t in encoded["offset_mapping"]]
    if not any(mask):
        raise ValueError(
            f"{where}: the chat template drops the assistant turns: no token is the assistant's."
        )
    labels = [
        t if keep or not completion_only_loss else IGNORE_INDEX for t, keep in zip(ids, mask, strict=True)
    ]
    return ids, labels


class ExampleEncoder:
    """A ``datasets.map(batched=True)`` callable: rows of one format -> ``input_ids``, ``labels`` and
    ``first_target`` (the index of the first label that is a target, position 0 never being one)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        data_format: str,
        completion_only_loss: bool,
        chat_template: str | None,
        source_split: str,
    ) -> None:
        self.tokenizer = tokenizer
        self.data_format = data_format
        self.completion_only_loss = completion_only_loss
        self.template = chat_template_of(tokenizer, chat_template) if data_format == "chat" else None
        self.source_split = source_split

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": [], "first_target": []}
        for j, row in enumerate(batch[ROW_COLUMN]):
            where = row_name(self.source_split, row)
            if self.data_format == "prompt_completion":
                ids, labels = encode_prompt_completion(
                    self.tokenizer,
                    batch["prompt"][j],
                    batch["completion"][j],
                    self.completion_only_loss,
                    where,
                )
            else:
                ids, labels = encode_chat(
                    self.tokenizer, batch["messages"][j], self.template, self.completion_only_loss, where
                )
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            targets = (i for i, t in enumerate(labels) if i and t != IGNORE_INDEX)
            out["first_target"].append(next(targets, NO_TARGET))
        return out


@dataclass(frozen=True)
class EndOfTurn:
    """What ends an assistant turn in generation: token ids (a special token such as ``<|im_end|>``, EOS) and
    stop strings (an end-of-turn text of several tokens, e.g. ``<|im_end|>`` on a tokenizer that does not
    have it as a token)."""

    token_ids: list[int]
    strings: list[str]


def end_of_turn(tokenizer: PreTrainedTokenizerBase, template: str) -> EndOfTurn:
    """What the template writes right after an assistant message (found by rendering a probe message): its
    first line, as a token id when it is one token or starts with a special one, else as a stop string; and
    the tokenizer's EOS."""
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}]
    text = render_chat(tokenizer, messages, template, "The end-of-turn probe")
    after = text[text.index(_SENTINEL) + len(_SENTINEL) :].strip()
    marker = after.splitlines()[0].strip() if after else ""
    ids, strings = [], []
    marker_ids = tokenizer(marker, add_special_tokens=False).input_ids if marker else []
    if len(marker_ids) == 1 or marker_ids[:1] and marker_ids[0] in tokenizer.added_tokens_decoder:
        ids.append(marker_ids[0])  # a token of its own: a special token such as <|im_end|>
    elif marker_ids:
        strings.append(marker)  # several tokens: transformers' StopStringCriteria finds them
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return EndOfTurn(ids, strings)
