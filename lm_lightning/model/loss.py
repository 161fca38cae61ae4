"""Next-token loss as (sum of NLL, number of target tokens), and the exact perplexity metric."""

from __future__ import annotations

import math
from typing import Any

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
    position_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sum of next-token negative log-likelihoods and the number of target tokens.

    Position ``t`` predicts ``labels[:, t + 1]``; label ``-100`` is not a target. A packed block of
    ``T`` tokens therefore has ``T - 1`` targets. With ``chunk_size``, the vocabulary projection and
    the loss run over ``chunk_size`` positions at a time in float32, so the full ``(B, T, V)`` float32
    logits (the usual evaluation OOM, transformers #15466) never exist at once, in evaluation or, since
    the gradients are computed chunk by chunk too, in training.

    ``position_ids`` that restart at 0 mark packed examples (with ``attention_mask=None``): transformers then
    keeps attention inside each (a block-diagonal mask for eager and sdpa). ``flash_attention_2`` finds them
    only in a batch of one row, so for it the rows are joined into one (exact: each row's first label is
    -100, and its padding continues its last example).
    """
    if labels is None:
        labels = input_ids
    if position_ids is not None and "flash" in str(getattr(model.config, "_attn_implementation", "")):
        input_ids, labels, position_ids = (x.reshape(1, -1) for x in (input_ids, labels, position_ids))
    targets = labels[:, 1:]
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
    n_targets = (targets != IGNORE_INDEX).sum()

    if chunk_size is None or not supports_chunked_loss(model):
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).logits
        logits = logits[:, :-1].float()  # (B, T-1, V)
        nll = F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return nll, n_targets

    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )[0]
    hidden = hidden[:, :-1]  # (B, T-1, C): the positions that have a target
    head = model.get_output_embeddings()
    nll = _LinearCrossEntropy.apply(
        hidden.flatten(0, 1), head.weight, head.bias, targets.flatten(), hidden.size(0) * chunk_size
    )
    return nll, n_targets


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of ``cross_entropy(hidden @ weight.T + bias, targets)``, ``chunk_rows`` rows at a time.

    When gradients are needed they are computed in the forward pass, chunk by chunk (the gradient of the
    summed loss with respect to the logits is ``softmax - one_hot``), so no chunk's float32 logits outlive
    it: the ``(N, V)`` logits are neither materialised nor kept for the backward pass, in training as in
    evaluation. The backward pass only scales the stored gradients. The same matmuls as the plain path
    (the idea of Liger-Kernel's fused linear cross-entropy), with less memory traffic.
    """

    @staticmethod
    def forward(
        ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk_rows: int
    ) -> Tensor:
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros_like(bias) if need_bias else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            h, t = hidden[rows], targets[rows]  # (n, C), (n,)
            logits = F.linear(h, weight, bias).float()  # (n, V)
            valid = t != IGNORE_INDEX
            t = torch.where(valid, t, 0)
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            total += ((lse - logits.gather(1, t[:, None]).squeeze(1)) * valid).sum()
            if need_hidden or need_weight or need_bias:
                grad_logits = logits.sub_(lse[:, None]).exp_()  # softmax, in place: (n, V)
                grad_logits.scatter_add_(1, t[:, None], -valid[:, None].to(grad_logits.dtype))
                grad_logits = grad_logits.mul_(valid[:, None]).to(h.dtype)
                if need_hidden:
                    grad_hidden[rows] = grad_logits @ weight
                if need_weight:
                    grad_weight += grad_logits.t() @ h
                if need_bias:
                    grad_bias += grad_logits.sum(0)
        ctx.needs = (need_hidden, need_weight, need_bias)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: Tensor) -> tuple[Tensor | None, ...]:
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_total if needed else None for needed in ctx.needs]
        return (*grads, None, None)


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
