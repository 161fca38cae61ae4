"""Next-token loss as (sum of NLL, number of target tokens), and the exact perplexity metric."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from transformers import PreTrainedModel

IGNORE_INDEX = -100

# Model types whose logits are exactly ``get_output_embeddings()(base_model(...).last_hidden_state)``:
# no logit scaling or soft-capping after the head, so the chunked path gives the same numbers.
_CHUNKABLE_MODEL_TYPES = frozenset(
    {"gpt2", "gpt_neo", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3"}
)


def supports_chunked_loss(model: PreTrainedModel) -> bool:
    """Whether ``causal_lm_nll`` can compute this model's loss without materialising all logits."""
    head = model.get_output_embeddings()
    return model.config.model_type in _CHUNKABLE_MODEL_TYPES and isinstance(head, nn.Linear)


def causal_lm_nll(
    model: PreTrainedModel,
    input_ids: Tensor,
    labels: Tensor | None = None,
    attention_mask: Tensor | None = None,
    chunk_size: int | None = 128,
) -> tuple[Tensor, Tensor]:
    """Sum of next-token negative log-likelihoods and the number of target tokens.

    Position ``t`` predicts ``labels[:, t + 1]``; label ``-100`` is not a target. A packed block of
    ``T`` tokens therefore has ``T - 1`` targets. With ``chunk_size``, the vocabulary projection and
    the loss run over ``chunk_size`` positions at a time in float32, so the full ``(B, T, V)`` float32
    logits (the usual evaluation OOM, transformers #15466) never exist at once.
    """
    if labels is None:
        labels = input_ids
    targets = labels[:, 1:]
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
    n_targets = (targets != IGNORE_INDEX).sum()

    if chunk_size is None or not supports_chunked_loss(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        logits = logits[:, :-1].float()  # (B, T-1, V)
        nll = F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return nll, n_targets

    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
    hidden = hidden[:, :-1]  # (B, T-1, C): the positions that have a target
    head = model.get_output_embeddings()
    nll = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.size(1), chunk_size):
        logits = head(hidden[:, start : start + chunk_size]).float()  # (B, chunk, V)
        chunk_targets = targets[:, start : start + chunk_size]
        nll = nll + F.cross_entropy(
            logits.flatten(0, 1), chunk_targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    return nll, n_targets


class TokenNLL(Metric):
    """Token-weighted mean negative log-likelihood over a whole split, summed across processes.

    ``compute`` returns the mean NLL; perplexity is its exponential. Written here because
    torchmetrics' ``Perplexity`` takes full logits, which the chunked loss never materialises.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll_sum: Tensor, n_tokens: Tensor) -> None:
        """Add a batch's summed NLL and its number of target tokens."""
        self.nll_sum += nll_sum.detach().to(torch.float64)
        self.n_tokens += n_tokens.detach().to(torch.long)

    def compute(self) -> Tensor:
        """Mean NLL per target token."""
        if self.n_tokens == 0:
            return torch.tensor(math.nan, dtype=torch.float64, device=self.nll_sum.device)
        return self.nll_sum / self.n_tokens
