"""DecodingConfig, the presets and generate_texts against transformers' own generate, on a tiny model."""

from __future__ import annotations

import dataclasses
import logging
import warnings

import pytest
import torch
from transformers.utils import logging as hf_logging

from lm_lightning.generation.decoding import (
    PRESETS,
    DecodingConfig,
    GeneratedText,
    _continuation_lengths,
    generate_texts,
    resolve_decoding,
)

# Of different token lengths, so that a batch of them is padded.
PROMPTS = ["The", "Python is a programming language that", "def f(x): return", "import os\nimport sys"]
NEW_TOKENS = 8

# The reference notebook's generate() arguments, written out by hand rather than derived from PRESETS.
NOTEBOOK_KWARGS = {
    "greedy": {},
    "beam": {"num_beams": 5, "early_stopping": True},
    "beam_no_repeat": {"num_beams": 5, "no_repeat_ngram_size": 2, "early_stopping": True},
    "sample": {"do_sample": True, "top_k": 0},
    "sample_temperature": {"do_sample": True, "top_k": 0, "temperature": 0.7},
    "top_k": {"do_sample": True, "top_k": 50},
    "top_p": {"do_sample": True, "top_p": 0.92, "top_k": 0},
    "top_k_top_p": {"do_sample": True, "top_k": 50, "top_p": 0.95, "num_return_sequences": 3},
}


@pytest.fixture
def model(tiny_gpt2):
    """The tiny GPT-2 with larger random weights: at the default init scale most prompts are continued by
    one repeated token, and a broken mask or padding would go unnoticed."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in tiny_gpt2.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.1, generator=generator)
    return tiny_gpt2


def short(name: str, **changes) -> DecodingConfig:
    return dataclasses.replace(PRESETS[name], **{"max_new_tokens": NEW_TOKENS, **changes})


class GenerateSpy:
    """Wraps ``model.generate`` to record its outputs and the state it ran in."""

    def __init__(self, model):
        self.generate, self.outputs, self.training, self.grad = model.generate, [], [], []
        model.generate = self

    def __call__(self, *args, **kwargs):
        self.training.append(self.generate.__self__.training)
        self.grad.append(torch.is_grad_enabled())
        output = self.generate(*args, **kwargs)
        self.outputs.append(output)
        return output


class TransformersLogs(logging.Handler):
    """Records what transformers logs (its logger does not propagate to the root, so caplog misses it)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_logs():
    # warning_once is cached for the whole process: a warning already given by another test would not show.
    hf_logging.warning_once.cache_clear()
    handler = TransformersLogs()
    logger = hf_logging.get_logger("transformers")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_equals_generate_with_notebook_arguments(model, bpe_tokenizer, name):
    prompt = PROMPTS[1]
    spy = GenerateSpy(model)
    ours = generate_texts(model, bpe_tokenizer, [prompt], short(name), name=name)

    inputs = bpe_tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(42)
    expected = spy.generate(
        **inputs, max_new_tokens=NEW_TOKENS, pad_token_id=bpe_tokenizer.eos_token_id, **NOTEBOOK_KWARGS[name]
    )
    assert torch.equal(spy.outputs[0], expected)
    new_ids = expected[:, inputs["input_ids"].shape[1] :]
    assert [s.text for s in ours] == bpe_tokenizer.batch_decode(new_ids, skip_special_tokens=True)
    assert [(s.prompt, s.preset, s.index) for s in ours] == [(prompt, name, i) for i in range(len(new_ids))]


def test_sampling_follows_the_seed(model, bpe_tokenizer):
    def texts(seed):
        return [s.text for s in generate_texts(model, bpe_tokenizer, PROMPTS, short("sample", seed=seed))]

    assert texts(1) == texts(1)
    assert texts(1) != texts(2)
    greedy = [s.text for s in generate_texts(model, bpe_tokenizer, PROMPTS, short("greedy"))]
    assert texts(1) != greedy


def test_seeding_leaves_the_callers_random_state_alone(model, bpe_tokenizer):
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    generate_texts(model, bpe_tokenizer, PROMPTS[:2], short("sample"))
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("name", ["greedy", "beam_no_repeat"])
def test_batched_output_equals_one_prompt_at_a_time(model, bpe_tokenizer, name):
    decoding = short(name)
    batched = generate_texts(model, bpe_tokenizer, PROMPTS, decoding, batch_size=3)
    alone = [s for prompt in PROMPTS for s in generate_texts(model, bpe_tokenizer, [prompt], decoding)]
    assert batched == alone
    assert len({s.text for s in batched}) == len(PROMPTS), "the prompts should get different continuations"


def test_batch_without_attention_mask_would_differ(model, bpe_tokenizer):
    """The check above can fail: the same batch without its attention mask gives other tokens."""
    alone = [s.text for s in generate_texts(model, bpe_tokenizer, PROMPTS, short("greedy"), batch_size=1)]
    bpe_tokenizer.padding_side = "left"
    inputs = bpe_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    output = model.generate(
        input_ids=inputs["input_ids"], max_new_tokens=NEW_TOKENS, pad_token_id=bpe_tokenizer.eos_token_id
    )
    unmasked = bpe_tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert unmasked != alone


def test_max_length_counts_each_prompts_own_length(model, bpe_tokenizer):
    decoding = DecodingConfig(max_length=24, max_new_tokens=3)
    batched = generate_texts(model, bpe_tokenizer, PROMPTS, decoding, batch_size=4)
    lengths = [len(bpe_tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert [s.num_new_tokens for s in batched] == [24 - n for n in lengths]
    alone = [s for prompt in PROMPTS for s in generate_texts(model, bpe_tokenizer, [prompt], decoding)]
    assert batched == alone


def test_no_generate_warnings_for_any_preset(model, bpe_tokenizer, transformers_logs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in PRESETS:
            generate_texts(model, bpe_tokenizer, PROMPTS, short(name), name=name, batch_size=4)
    assert [str(w.message) for w in caught] == []
    assert transformers_logs.messages == []


def test_warning_capture_sees_transformers_warnings(model, bpe_tokenizer, transformers_logs):
    """The check above can fail: a batch without mask and pad token id is reported."""
    bpe_tokenizer.padding_side = "left"
    inputs = bpe_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    model.generate(input_ids=inputs["input_ids"], max_new_tokens=2)
    assert any("attention mask" in m for m in transformers_logs.messages)


def test_generation_config_sets_tokens_and_leaves_out_unused_settings(bpe_tokenizer):
    eos = bpe_tokenizer.eos_token_id
    greedy = PRESETS["greedy"].to_generation_config(bpe_tokenizer)
    assert (greedy.pad_token_id, greedy.eos_token_id, greedy.max_new_tokens, greedy.max_length) == (
        eos,
        eos,
        50,
        None,
    )
    assert (greedy.do_sample, greedy.num_beams) == (False, 1)
    assert (greedy.temperature, greedy.top_k, greedy.top_p, greedy.early_stopping) == (None, None, None, None)

    sample = PRESETS["sample"].to_generation_config(bpe_tokenizer)
    # top_k=0 must be explicit: left unset, generate would apply its default top_k=50.
    assert (sample.do_sample, sample.top_k, sample.top_p, sample.temperature) == (True, 0, 1.0, 1.0)

    beam = DecodingConfig(num_beams=5, early_stopping=True, max_length=30).to_generation_config(bpe_tokenizer)
    assert (beam.early_stopping, beam.length_penalty, beam.max_length, beam.max_new_tokens) == (
        True,
        1.0,
        30,
        None,
    )


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"num_return_sequences": 3}, "num_return_sequences"),
        ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
        ({"num_return_sequences": 0, "do_sample": True}, "num_return_sequences"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"num_beams": 0}, "num_beams"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_length": 0}, "max_length"),
        ({"max_new_tokens": None}, "max_new_tokens"),
        ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ],
)
def test_invalid_settings_raise_naming_field_and_value(changes, field):
    with pytest.raises(ValueError, match=f"{field}={changes[field]}"):
        DecodingConfig(**changes)


def test_valid_settings_that_look_close_to_invalid_ones():
    assert DecodingConfig(do_sample=True, num_return_sequences=3).num_return_sequences == 3
    assert DecodingConfig(num_beams=3, num_return_sequences=3).num_return_sequences == 3
    assert DecodingConfig(max_new_tokens=None, max_length=10).max_length == 10
    assert DecodingConfig(top_p=1.0, top_k=0).top_p == 1.0


def test_resolve_decoding():
    name, decoding = resolve_decoding("beam")
    assert (name, decoding) == ("beam", PRESETS["beam"])
    decoding.num_beams = 2
    assert PRESETS["beam"].num_beams == 5, "a resolved preset must be a copy"

    name, decoding = resolve_decoding({"preset": "top_k", "temperature": 0.5})
    assert name == "top_k(temperature=0.5)"
    assert decoding == dataclasses.replace(PRESETS["top_k"], temperature=0.5)
    assert resolve_decoding({"preset": "greedy", "name": "short", "max_new_tokens": 5}) == (
        "short",
        dataclasses.replace(PRESETS["greedy"], max_new_tokens=5),
    )
    assert resolve_decoding({"num_beams": 2}) == ("custom(num_beams=2)", DecodingConfig(num_beams=2))
    config = DecodingConfig(num_beams=3)
    assert resolve_decoding(config) == ("custom", config)


def test_resolve_decoding_errors():
    with pytest.raises(ValueError, match=r"decoding='nucleus' is not a preset: choose one of \['beam',"):
        resolve_decoding("nucleus")
    with pytest.raises(ValueError, match="preset='nucleus' is not a preset"):
        resolve_decoding({"preset": "nucleus"})
    with pytest.raises(ValueError, match=r"unknown settings \['topk'\]"):
        resolve_decoding({"preset": "greedy", "topk": 5})
    with pytest.raises(ValueError, match="top_p=2.0"):
        resolve_decoding({"preset": "top_p", "top_p": 2.0})


def test_continuation_lengths_stop_at_the_first_eos():
    new_ids = torch.tensor([[5, 6, 0, 0, 0], [5, 6, 7, 8, 9], [0, 0, 0, 0, 0], [5, 9, 0, 0, 0]])
    assert _continuation_lengths(new_ids, [0]) == [3, 5, 1, 3]
    assert _continuation_lengths(new_ids, [0, 9]) == [3, 5, 1, 2]
    assert _continuation_lengths(new_ids, []) == [5, 5, 5, 5]


def test_generation_stops_at_eos_and_padding_is_not_counted(model, bpe_tokenizer):
    """A token of the first greedy continuation is made a stop token in the model's generation config."""
    decoding, prompts = short("greedy"), PROMPTS[:2]
    spy = GenerateSpy(model)
    generate_texts(model, bpe_tokenizer, prompts, decoding)
    prompt_length = max(len(ids) for ids in bpe_tokenizer(prompts)["input_ids"])
    full = spy.outputs[0][:, prompt_length:].tolist()
    stop = full[0][NEW_TOKENS // 2]
    model.generation_config.eos_token_id = [bpe_tokenizer.eos_token_id, stop]

    stopped = generate_texts(model, bpe_tokenizer, prompts, decoding)
    assert stopped[0].num_new_tokens <= NEW_TOKENS // 2 + 1
    for sample, ids in zip(stopped, full, strict=True):
        expected = ids.index(stop) + 1 if stop in ids else len(ids)
        assert sample.num_new_tokens == expected
        assert sample.text == bpe_tokenizer.decode(ids[:expected], skip_special_tokens=True)


def test_model_and_tokenizer_are_left_as_they_were(model, bpe_tokenizer):
    model.train()
    model.transformer.h[0].eval()  # a frozen block must stay in eval mode
    bpe_tokenizer.padding_side = "right"
    spy = GenerateSpy(model)
    generate_texts(model, bpe_tokenizer, PROMPTS, short("greedy"), batch_size=2)
    assert spy.training == [False, False]
    assert spy.grad == [False, False]
    assert model.training and model.transformer.h[1].training and model.lm_head.training
    assert not model.transformer.h[0].training
    assert bpe_tokenizer.padding_side == "right"


def test_bad_prompts_raise(model, bpe_tokenizer):
    with pytest.raises(TypeError, match="is a string"):
        generate_texts(model, bpe_tokenizer, "The", short("greedy"))
    with pytest.raises(ValueError, match=r"prompts\[1\]='' has no tokens"):
        generate_texts(model, bpe_tokenizer, ["The", ""], short("greedy"))
    with pytest.raises(
        ValueError, match=r"prompts\[0\] has \d+ tokens .* more than the model's 128 positions"
    ):
        generate_texts(model, bpe_tokenizer, ["word " * 100], short("greedy", max_new_tokens=50))
    with pytest.raises(ValueError, match="max_length=3 leaves no room"):
        generate_texts(model, bpe_tokenizer, [PROMPTS[1]], DecodingConfig(max_length=3))


def test_progress_bar(model, bpe_tokenizer, capsys):
    samples = generate_texts(model, bpe_tokenizer, PROMPTS, short("greedy"), name="greedy", progress=True)
    assert "generating (greedy)" in capsys.readouterr().err
    assert all(isinstance(s, GeneratedText) for s in samples) and len(samples) == len(PROMPTS)
