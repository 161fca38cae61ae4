"""Per-sequence sums of target-token log-probabilities, through the chunked head of ``model.loss``.

Preference tuning needs one number per sequence (the log-probability of its completion), and the gradient of
a loss of those numbers. ``causal_lm_nll`` sums over the whole batch, and computes its gradient in the
forward pass, chunk by chunk, because the gradient of a sum is known before the loss is. Here the weight of
each sequence in the gradient (``dL/dlogp``) is known only after every sequence's sum is: the backward pass
recomputes each chunk's logits instead (one more head matmul), so the full ``(B, T, V)`` logits still never
exist at once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lm_lightning.model.loss import (
    IGNORE_INDEX,
    apply_head_transform,
    chain_head_transform,
    head_transform,
    supports_chunked_loss,
    unwrap_model,
)


def sequence_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    attention_mask: Tensor | None = None,
    chunk_size: int | None = 128,
) -> tuple[Tensor, Tensor]:
    """Per sequence, the sum of its target tokens' log-probabilities (float32) and their number: two ``(B,)``.

    Targets as in ``causal_lm_nll``: position ``t`` predicts ``labels[:, t + 1]``, and ``-100`` (or
    ``attention_mask == 0``) is not a target. With ``chunk_size``, the head runs over ``B * chunk_size`` rows
    at a time; without it (or for a head the chunked path does not know), over the model's full logits.
    """
    targets = labels[:, 1:]
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
    valid = targets != IGNORE_INDEX
    n_targets = valid.sum(1)
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if chunk_size is None or not supports_chunked_loss(model):
        logits = model(**kwargs).logits[:, :-1].float()  # (B, T-1, V)
        logp = logits.log_softmax(-1).gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
        return torch.where(valid, logp, 0.0).sum(1), n_targets
    hf_model = unwrap_model(model)  # LoRA layers sit inside it: its base_model runs through them
    hidden = hf_model.base_model(**kwargs)[0][:, :-1]  # (B, T-1, C)
    head = hf_model.get_output_embeddings()
    batch, positions = targets.shape
    groups = torch.arange(batch, device=targets.device).repeat_interleave(positions)  # (B * (T-1),)
    transform = head_transform(hf_model.config)
    logps = _LinearLogProbs.apply(
        hidden.flatten(0, 1), head.weight, head.bias, targets.flatten(), groups, batch, batch * chunk_size,
        transform,
    )  # fmt: skip
    return logps, n_targets


class _LinearLogProbs(torch.autograd.Function):
    """Per group, the sum over its rows of ``log_softmax(transform(hidden @ weight.T + bias))[target]``.

    Forward: chunk by chunk, no gradient kept. Backward: each chunk's logits again, and the gradient of
    ``sum_g grad_g * logp_g`` with respect to them, ``grad_{g(row)} * (one_hot - softmax)``; the head's
    gradients are accumulated over the chunks in float32 and cast once, as in ``causal_lm_nll``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        groups: Tensor,
        n_groups: int,
        chunk_rows: int,
        transform: dict[str, float] | None,
    ) -> Tensor:
        transform = transform or {}
        out = torch.zeros(n_groups, dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = apply_head_transform(F.linear(hidden[rows], weight, bias).float(), transform)  # (n, V)
            t = targets[rows]
            valid = t != IGNORE_INDEX
            logp = logits.gather(1, torch.where(valid, t, 0)[:, None]).squeeze(1) - logits.logsumexp(-1)
            out.index_add_(0, groups[rows], torch.where(valid, logp, 0.0))
        ctx.save_for_backward(hidden, weight, bias, targets, groups)
        ctx.chunk_rows, ctx.transform = chunk_rows, transform
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, targets, groups = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        transform = ctx.transform
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        row_weight = grad_out.float()[groups]  # (N,): the gradient reaching each row's log-probability
        for start in range(0, hidden.size(0), ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            h, t = hidden[rows], targets[rows]
            logits = apply_head_transform(F.linear(h, weight, bias).float(), transform)  # (n, V)
            valid = t != IGNORE_INDEX
            t = torch.where(valid, t, 0)
            capped = 1 - (logits / transform["softcap"]) ** 2 if "softcap" in transform else None
            w = torch.where(valid, row_weight[rows], 0.0)  # (n,)
            softmax = logits.sub_(logits.logsumexp(-1, keepdim=True)).exp_()  # in place: (n, V)
            grad_logits = softmax.mul_(-w[:, None]).scatter_add_(1, t[:, None], w[:, None])  # w (one_hot - p)
            grad_logits = chain_head_transform(grad_logits, capped, transform)
            if need_bias:
                grad_bias += grad_logits.sum(0)
            grad_logits = grad_logits.to(h.dtype)
            if need_hidden:
                grad_hidden[rows] = grad_logits @ weight
            if need_weight:
                grad_weight += (grad_logits.t() @ h).float()
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            *(None,) * 5,
        )
