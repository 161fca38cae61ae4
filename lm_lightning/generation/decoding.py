"""Decoding settings and batched text generation.

``DecodingConfig`` is the one typed description of decoding that the sampling callback and the ``predict``
command share; it maps onto ``transformers.GenerationConfig``, so the search itself is transformers' own.
``PRESETS`` are the settings of the reference notebook (the Hugging Face blog post "How to generate text").
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class DecodingConfig:
    """How to continue a prompt: the subset of ``transformers.GenerationConfig`` the reference notebook uses.

    Sampling settings (``temperature``, ``top_k``, ``top_p``) apply only with ``do_sample=True`` and beam
    settings (``early_stopping``, ``length_penalty``) only with ``num_beams > 1``; otherwise they are not
    passed on.
    """

    max_new_tokens: int | None = 50
    """Number of tokens to generate after the prompt. Ignored when ``max_length`` is set."""
    max_length: int | None = None
    """Total length in tokens of each prompt plus its continuation (the reference notebook's setting).
    When set, it wins over ``max_new_tokens``."""
    do_sample: bool = False
    """Sample the next token from the model's distribution instead of searching for the most likely one."""
    num_beams: int = 1
    """Number of beams of beam search; 1 means no beam search."""
    no_repeat_ngram_size: int = 0
    """Forbid any n-gram of this size from occurring twice in a sequence, the prompt included; 0 disables."""
    num_return_sequences: int = 1
    """Continuations returned per prompt: independent samples, or the best beams (at most ``num_beams``)."""
    early_stopping: bool = False
    """Beam search stops as soon as ``num_beams`` finished candidates exist."""
    length_penalty: float = 1.0
    """Exponent on the length by which beam scores are divided: > 0 favours longer sequences, < 0 shorter."""
    temperature: float = 1.0
    """Divides the logits before sampling: < 1 sharpens the distribution, > 1 flattens it."""
    top_k: int = 0
    """Sample only from the ``top_k`` most likely tokens; 0 disables it (transformers' default: 50)."""
    top_p: float = 1.0
    """Sample only from the smallest set of most likely tokens whose probabilities add up to ``top_p``."""
    repetition_penalty: float = 1.0
    """Penalty on the logits of tokens already in the sequence (CTRL paper); 1.0 means none."""
    seed: int | None = 42
    """Seed of the random generator before each batch of prompts, so samples are reproducible; ``None`` draws
    from (and advances) the global random state."""

    def __post_init__(self) -> None:
        if self.max_length is None and self.max_new_tokens is None:
            raise ValueError(
                "max_new_tokens=None and max_length=None: set one (max_length wins over the other)."
            )
        positive = {
            "max_new_tokens": self.max_new_tokens,
            "max_length": self.max_length,
            "num_beams": self.num_beams,
            "num_return_sequences": self.num_return_sequences,
        }
        for name, value in positive.items():
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} is invalid: it must be an integer >= 1.")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(
                f"no_repeat_ngram_size={self.no_repeat_ngram_size} is invalid: it must be >= 0 (0 disables)."
            )
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} is invalid: it must be >= 0 (0 disables top-k filtering).")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} is invalid: it must be in (0, 1] (1.0 disables it).")
        if self.temperature <= 0.0:
            raise ValueError(
                f"temperature={self.temperature} is invalid: it must be > 0 (for deterministic output use "
                "do_sample=False)."
            )
        if self.repetition_penalty <= 0.0:
            raise ValueError(
                f"repetition_penalty={self.repetition_penalty} is invalid: it must be > 0 (1.0: none)."
            )
        if not self.do_sample and self.num_return_sequences > self.num_beams:
            raise ValueError(
                f"num_return_sequences={self.num_return_sequences} with num_beams={self.num_beams} and "
                "do_sample=False is invalid: without sampling at most num_beams distinct sequences exist; "
                "set num_return_sequences <= num_beams, raise num_beams, or set do_sample=True."
            )

    def to_generation_config(self, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
        """The ``GenerationConfig`` for these settings, with the tokenizer's pad and EOS token ids."""
        eos_token_id = tokenizer.eos_token_id
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_id
        if pad_token_id is None:
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an EOS token: set its pad_token."
            )
        kwargs: dict[str, Any] = {
            "do_sample": self.do_sample,
            "num_beams": self.num_beams,
            "num_return_sequences": self.num_return_sequences,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
            "repetition_penalty": self.repetition_penalty,
            # GPT-2 has no pad token; leaving it unset makes generate warn on every call (transformers #2630).
            "pad_token_id": pad_token_id,
            "eos_token_id": eos_token_id,
        }
        if self.max_length is not None:
            kwargs["max_length"] = self.max_length
        else:
            kwargs["max_new_tokens"] = self.max_new_tokens
        # Settings of a mode that is off are left out: transformers warns about them, and leaving them unset
        # keeps the config equal to what a user of generate would write by hand.
        if self.do_sample:
            # top_k is always passed: unset, transformers falls back to its default of 50, not "disabled".
            kwargs.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        if self.num_beams > 1:
            kwargs.update(early_stopping=self.early_stopping, length_penalty=self.length_penalty)
        return GenerationConfig(**kwargs)


PRESETS: dict[str, DecodingConfig] = {
    "greedy": DecodingConfig(),
    "beam": DecodingConfig(num_beams=5, early_stopping=True),
    "beam_no_repeat": DecodingConfig(num_beams=5, no_repeat_ngram_size=2, early_stopping=True),
    "sample": DecodingConfig(do_sample=True, top_k=0),
    "sample_temperature": DecodingConfig(do_sample=True, top_k=0, temperature=0.7),
    "top_k": DecodingConfig(do_sample=True, top_k=50),
    "top_p": DecodingConfig(do_sample=True, top_p=0.92, top_k=0),
    "top_k_top_p": DecodingConfig(do_sample=True, top_k=50, top_p=0.95, num_return_sequences=3),
}
"""The decoding cells of the reference notebook, by name."""


def resolve_decoding(spec: str | DecodingConfig | Mapping[str, Any]) -> tuple[str, DecodingConfig]:
    """A name and a ``DecodingConfig`` from a preset name, a config, or a mapping of settings.

    A mapping may name a ``preset`` to start from (default: ``DecodingConfig()``'s defaults) and a ``name``
    for the outputs; its other keys override the preset's fields.
    """
    if isinstance(spec, DecodingConfig):
        return "custom", spec
    if isinstance(spec, str):
        return spec, dataclasses.replace(_preset(spec, "decoding"))
    if not isinstance(spec, Mapping):
        raise TypeError(
            f"decoding={spec!r} is a {type(spec).__name__}: give a preset name, DecodingConfig or mapping."
        )
    overrides = dict(spec)
    preset = overrides.pop("preset", None)
    name = overrides.pop("name", None)
    fields = {f.name for f in dataclasses.fields(DecodingConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"decoding has unknown settings {unknown}: valid keys are 'preset', 'name' and {sorted(fields)}."
        )
    base = _preset(preset, "preset") if preset is not None else DecodingConfig()
    config = dataclasses.replace(base, **overrides)
    if name is None:
        settings = ", ".join(f"{key}={value}" for key, value in overrides.items())
        name = f"{preset or 'custom'}({settings})" if settings else (preset or "custom")
    return str(name), config


def resolve_decodings(
    specs: Sequence[str | DecodingConfig | Mapping[str, Any]] | str | DecodingConfig | Mapping[str, Any],
    max_new_tokens: int | None = None,
) -> list[tuple[str, DecodingConfig]]:
    """Unique names and ``DecodingConfig``s for several decoding specs (see ``resolve_decoding``).

    ``max_new_tokens``, when given, overrides the length of every one.
    """
    if isinstance(specs, (str, DecodingConfig, Mapping)):
        specs = [specs]
    if not specs:
        raise ValueError("decodings=[] is invalid: give at least one preset name or DecodingConfig.")
    resolved: list[tuple[str, DecodingConfig]] = []
    for spec in specs:
        name, decoding = resolve_decoding(spec)
        if max_new_tokens is not None:
            decoding = dataclasses.replace(decoding, max_new_tokens=max_new_tokens, max_length=None)
        # Names key TensorBoard tags and JSONL lines, so two unnamed configs must not share one.
        taken = {taken_name for taken_name, _ in resolved}
        unique, n = name, 1
        while unique in taken:
            unique, n = f"{name}_{n}", n + 1
        resolved.append((unique, decoding))
    return resolved


def _preset(name: str, setting: str) -> DecodingConfig:
    if name not in PRESETS:
        raise ValueError(f"{setting}={name!r} is not a preset: choose one of {sorted(PRESETS)}.")
    return PRESETS[name]


@dataclass
class GeneratedText:
    """One continuation of one prompt."""

    prompt: str
    """The prompt as given."""
    preset: str
    """Name of the decoding settings (a preset name, or ``custom``)."""
    index: int
    """Which of the ``num_return_sequences`` continuations of the prompt this is."""
    text: str
    """The continuation alone, without the prompt and without special tokens."""
    num_new_tokens: int
    """Tokens the model generated, a closing EOS included, the padding after it not."""


def generate_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    decoding: DecodingConfig,
    name: str = "custom",
    batch_size: int = 8,
    progress: bool = False,
    add_special_tokens: bool = True,
    stop_token_ids: Sequence[int] | None = None,
    stop_strings: Sequence[str] | None = None,
) -> list[GeneratedText]:
    """Continuations of each prompt by ``model.generate``, ``num_return_sequences`` each, in prompt order.

    Prompts are batched with left padding and an attention mask, so a batch gives the same greedy output as
    one prompt at a time. With a ``seed``, sampling is reproducible for the same prompts and batch size, and
    the caller's random state is left as it was. The model's train/eval modes and the tokenizer are left as
    they were. Prompts rendered by a chat template already hold their special tokens: tokenize them with
    ``add_special_tokens=False`` and stop at the template's end of turn (``stop_token_ids``, and
    ``stop_strings`` for an end of turn of several tokens: it is cut from the text, counted in the tokens).
    """
    if isinstance(prompts, str):
        raise TypeError(f"prompts={prompts!r} is a string: give a list of prompts.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: it must be >= 1.")
    prompts = list(prompts)
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]]
    for i, length in enumerate(lengths):
        if length == 0:
            raise ValueError(f"prompts[{i}]={prompts[i]!r} has no tokens: give a non-empty prompt.")
    # max_length counts the prompt, and generate counts the padded one: only prompts of equal length share
    # a batch, so that each prompt gets exactly max_length tokens in total.
    batches = _batches(lengths, batch_size, by_length=decoding.max_length is not None)
    max_positions = getattr(model.config, "max_position_embeddings", None)

    results: list[list[GeneratedText]] = [[] for _ in prompts]
    with _eval_mode(model), _left_padding(tokenizer), torch.no_grad():
        for indices in _progress(batches, progress, name):
            inputs = tokenizer(
                [prompts[i] for i in indices],
                return_tensors="pt",
                padding=True,
                add_special_tokens=add_special_tokens,
            )
            prompt_length = inputs["input_ids"].shape[1]
            new_tokens = decoding.max_new_tokens
            if decoding.max_length is not None:
                new_tokens = decoding.max_length - prompt_length
                if new_tokens < 1:
                    raise ValueError(
                        f"max_length={decoding.max_length} leaves no room for new tokens after "
                        f"prompts[{indices[0]}] of {prompt_length} tokens: raise max_length or set "
                        "max_new_tokens instead."
                    )
            if max_positions is not None and prompt_length + new_tokens > max_positions:
                longest = max(indices, key=lambda i: lengths[i])
                raise ValueError(
                    f"prompts[{longest}] has {prompt_length} tokens and {new_tokens} new tokens would make "
                    f"{prompt_length + new_tokens}, more than the model's {max_positions} positions: shorten "
                    "the prompt or lower max_new_tokens/max_length."
                )
            # Passed as max_new_tokens even for max_length: a checkpoint's default max_new_tokens would win.
            config = _generation_config(
                dataclasses.replace(decoding, max_length=None, max_new_tokens=new_tokens), tokenizer, model
            )
            config.eos_token_id = _merge_ids(config.eos_token_id, list(stop_token_ids or []))
            strings = {"tokenizer": tokenizer} if stop_strings else {}  # StopStringCriteria needs it
            config.stop_strings = list(stop_strings) if stop_strings else config.stop_strings
            with _seeded(decoding.seed, model.device):
                output = model.generate(
                    input_ids=inputs["input_ids"].to(model.device),
                    attention_mask=inputs["attention_mask"].to(model.device),
                    generation_config=config,
                    logits_processor=_sampling_warpers(config),
                    **strings,
                )
            new_ids = output[:, prompt_length:].cpu()  # (batch * num_return_sequences, new)
            counts = _continuation_lengths(new_ids, config.eos_token_id or [])
            for row, (ids, count) in enumerate(zip(new_ids, counts, strict=True)):
                i, index = indices[row // decoding.num_return_sequences], row % decoding.num_return_sequences
                count, text = _cut_at_stop_string(tokenizer, ids[:count], stop_strings or [])
                results[i].append(GeneratedText(prompts[i], name, index, text, count))
    return [result for per_prompt in results for result in per_prompt]


def _generation_config(
    decoding: DecodingConfig, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel
) -> GenerationConfig:
    config = decoding.to_generation_config(tokenizer)
    # A checkpoint's own generation config may list extra stop tokens (chat models do): keep stopping at them.
    config.eos_token_id = _merge_ids(config.eos_token_id, model.generation_config.eos_token_id)
    return config


def _sampling_warpers(config: GenerationConfig) -> Any:
    """transformers' temperature, top-k and top-p warpers as one ``TopKTopPWarper`` (the same tokens, without
    sorting the vocabulary), taken out of ``config`` so that ``generate`` does not apply them twice."""
    from transformers import LogitsProcessorList

    from lm_lightning.generation.warpers import TopKTopPWarper

    if not config.do_sample:
        return LogitsProcessorList()
    eos = _merge_ids(config.eos_token_id, None) or []
    min_tokens_to_keep = (len(eos) + 1 if eos else 2) if (config.num_beams or 1) > 1 else 1  # as generate
    temperature = 1.0 if config.temperature is None else config.temperature
    top_p = 1.0 if config.top_p is None else config.top_p
    warper = TopKTopPWarper(temperature, config.top_k or 0, top_p, min_tokens_to_keep)
    config.temperature, config.top_k, config.top_p = 1.0, 0, 1.0
    return LogitsProcessorList([warper])


def _batches(lengths: list[int], batch_size: int, by_length: bool) -> list[list[int]]:
    """Indices of the prompts in each batch, in order; with ``by_length`` only equal lengths share a batch."""
    groups: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
        groups.setdefault(length if by_length else 0, []).append(i)
    return [group[j : j + batch_size] for group in groups.values() for j in range(0, len(group), batch_size)]


def _continuation_lengths(new_ids: torch.Tensor, eos_ids: list[int]) -> list[int]:
    """Per row of generated ids, the tokens up to and including the first EOS (all of them if none)."""
    if not eos_ids or new_ids.shape[1] == 0:
        return [new_ids.shape[1]] * new_ids.shape[0]
    is_eos = torch.isin(new_ids, torch.tensor(eos_ids, dtype=new_ids.dtype))
    first_eos = is_eos.int().argmax(dim=1)
    return torch.where(is_eos.any(dim=1), first_eos + 1, new_ids.shape[1]).tolist()


def _cut_at_stop_string(
    tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor, stop_strings: Sequence[str]
) -> tuple[int, str]:
    """The tokens up to the one that completes the first stop string (all of them if none does), and their
    text without the stop string. A row that stopped there was padded after it, in a batch that went on."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if not any(s in text for s in stop_strings):
        return len(ids), text
    low, high = 1, len(ids)  # the shortest prefix whose text holds a stop string: it only grows
    while low < high:
        middle = (low + high) // 2
        if any(s in tokenizer.decode(ids[:middle], skip_special_tokens=True) for s in stop_strings):
            high = middle
        else:
            low = middle + 1
    text = tokenizer.decode(ids[:low], skip_special_tokens=True)
    return low, text[: min(text.index(s) for s in stop_strings if s in text)]


def _merge_ids(ids: int | list[int] | None, more: int | list[int] | None) -> list[int] | None:
    merged = []
    for value in (ids, more):
        for token_id in [value] if isinstance(value, int) else value or []:
            if token_id not in merged:
                merged.append(int(token_id))
    return merged or None


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    # Per module, not model.train(was_training): a module frozen in eval mode must stay so.
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def _left_padding(tokenizer: PreTrainedTokenizerBase) -> Iterator[None]:
    # Decoder-only models continue from the last position, so padding must come first (transformers #25790).
    padding_side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.padding_side = padding_side
        if pad_token is None:
            tokenizer.pad_token = None


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seeds the global random state (generate samples from it) and restores the caller's on exit.

    Restoring matters when sampling during training: the training's own random stream (dropout, shuffling)
    must not depend on whether samples were drawn.
    """
    if seed is None:
        yield
        return
    devices, device_type = ([], None) if device.type == "cpu" else ([device], device.type)
    with torch.random.fork_rng(devices=devices, device_type=device_type):
        torch.manual_seed(seed)
        yield


def _progress(batches: list[list[int]], enabled: bool, name: str) -> Iterator[list[int]]:
    if not enabled:
        yield from batches
        return
    from tqdm.auto import tqdm

    yield from tqdm(batches, desc=f"generating ({name})", unit="batch")
