"""The sort-free top-k/top-p warper: the same processed scores as transformers' warpers, and under a seed the
same sampled tokens as ``model.generate``."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lm_lightning.generation.decoding import _sampling_warpers
from lm_lightning.generation.warpers import TopKTopPWarper

VOCAB = 4096


def _reference(scores, temperature=1.0, top_k=0, top_p=1.0, min_tokens_to_keep=1):
    ids = torch.zeros(scores.shape[0], 1, dtype=torch.long)
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k, min_tokens_to_keep=min_tokens_to_keep)(ids, scores)
    return TopPLogitsWarper(top_p, min_tokens_to_keep=min_tokens_to_keep)(ids, scores)


def _rows(kind: str, n: int = 32, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed({"peaked": 0, "flat": 1, "ties": 2}[kind])
    if kind == "peaked":  # a trained model's: a few tokens hold most of the mass
        return torch.randn(n, vocab, generator=g) * 4
    if kind == "flat":  # an untrained model's
        return torch.randn(n, vocab, generator=g) * 0.3
    return torch.randint(-8, 3, (n, vocab), generator=g).float()  # groups of equal logits everywhere


@pytest.mark.parametrize("kind", ["peaked", "flat", "ties"])
@pytest.mark.parametrize(
    "settings",
    [
        {"top_p": 0.92},
        {"top_p": 0.5, "temperature": 0.7},
        {"top_p": 0.95, "top_k": 50},
        {"top_p": 0.9, "min_tokens_to_keep": 3},
        {"top_p": 0.3, "temperature": 3.0, "min_tokens_to_keep": 2},
    ],
)
def test_filtered_scores_equal_transformers_warpers(kind, settings):
    scores = _rows(kind)
    warper = TopKTopPWarper(**settings, candidates=256, tail_candidates=1024)
    ours = warper(torch.zeros(len(scores), 1, dtype=torch.long), scores)
    assert torch.equal(ours, _reference(scores, **settings))
    assert warper.rows == len(scores)


@pytest.mark.parametrize("kind", ["peaked", "flat"])
def test_most_rows_are_decided_without_the_full_sort(kind):
    warper = TopKTopPWarper(top_p=0.92, candidates=256, tail_candidates=1024)
    scores = _rows(kind)
    warper(torch.zeros(len(scores), 1, dtype=torch.long), scores)
    assert warper.fallback_rows <= len(scores) // 4, warper.fallback_rows


def test_ties_at_the_cut_follow_transformers_sort():
    # 10 tokens tied at the top hold about 0.95 of the mass: the cut at top_p 0.5 falls in the group, where
    # only the order of transformers' sort says which of the tied tokens stay.
    scores = torch.full((4, VOCAB), -10.0)
    scores[:, 100:110] = 5.0
    scores[1, 3000:3010] = 5.0  # two tied groups far apart
    scores[2, 7] = 6.0
    for top_p, keep in [(0.5, 1), (0.5, 4), (0.999, 1), (0.05, 12)]:
        warper = TopKTopPWarper(top_p=top_p, min_tokens_to_keep=keep, candidates=64, tail_candidates=64)
        ours = warper(torch.zeros(4, 1, dtype=torch.long), scores)
        assert torch.equal(ours, _reference(scores, top_p=top_p, min_tokens_to_keep=keep)), (top_p, keep)


def _model(scale: float) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.mul_(scale)  # scale 1: flat next-token distributions; larger: peaked ones
    return model


@pytest.mark.parametrize("scale", [1.0, 8.0])
@pytest.mark.parametrize(
    "settings",
    [
        {"top_p": 0.92, "top_k": 0},
        {"top_p": 0.95, "top_k": 50, "num_return_sequences": 3},
        {"top_p": 0.8, "top_k": 0, "temperature": 0.7},
        {"top_p": 0.9, "top_k": 0, "num_beams": 2},  # beam sampling: min_tokens_to_keep 2
    ],
)
def test_generate_samples_the_same_tokens_as_transformers(scale, settings):
    model = _model(scale)
    input_ids = torch.randint(1, VOCAB, (4, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(input_ids)
    mask[0, :2] = 0  # a left-padded row
    config = GenerationConfig(do_sample=True, max_new_tokens=12, pad_token_id=0, eos_token_id=0, **settings)
    torch.manual_seed(7)
    expected = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)

    ours = GenerationConfig(**config.to_diff_dict())
    processors = _sampling_warpers(ours)
    assert (ours.temperature, ours.top_k, ours.top_p) == (1.0, 0, 1.0)  # not applied twice
    torch.manual_seed(7)
    got = model.generate(
        input_ids=input_ids, attention_mask=mask, generation_config=ours, logits_processor=processors
    )
    assert torch.equal(got, expected)
    warper = processors[0]
    assert warper.rows > 0 and warper.fallback_rows < warper.rows  # the sort-free path ran
