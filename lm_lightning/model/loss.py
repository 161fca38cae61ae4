"""Next-token loss as (sum of NLL, number of target tokens), and the exact perplexity metric."""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from transformers import PreTrainedModel

IGNORE_INDEX = -100

# Model types whose logits are ``transform(get_output_embeddings()(base_model(...)[0]))``, with ``transform``
# the family's own elementwise head transform (below): the chunked path gives the same numbers for these.
# Checked against each family's own logits, values and gradients (tests/test_families.py). Other types fall
# back to the model's full logits: slower, never a wrong number.
_PLAIN_HEAD_TYPES = frozenset(
    {"gpt2", "gpt_neo", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "opt"}
    | {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"}  # mixture of experts: the router is inside base_model
)
_TRANSFORMED_HEAD_TYPES = frozenset({"gemma2", "cohere", "granite"})


def head_transform(config: Any) -> dict[str, float] | None:
    """What the family's ``ForCausalLM.forward`` does to ``lm_head(hidden)``: ``{}`` for nothing, keys
    ``mul`` (Cohere's ``logit_scale``), ``div`` (Granite's ``logits_scaling``) and ``softcap``
    (``cap * tanh(logits / cap)``, Gemma-2's ``final_logit_softcapping``); ``None`` when not known."""
    model_type = config.model_type
    if model_type in _PLAIN_HEAD_TYPES:
        return {}
    if model_type not in _TRANSFORMED_HEAD_TYPES:
        return None
    transform: dict[str, float] = {}
    if model_type == "cohere":
        transform["mul"] = float(config.logit_scale)
    if model_type == "granite":
        transform["div"] = float(config.logits_scaling)
    if getattr(config, "final_logit_softcapping", None):
        transform["softcap"] = float(config.final_logit_softcapping)
    return transform


def unwrap_model(model: nn.Module) -> PreTrainedModel:
    """The Hugging Face model inside a ``peft`` ``PeftModel`` (whose ``base_model`` returns logits)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def supports_chunked_loss(model: PreTrainedModel) -> bool:
    """Whether ``causal_lm_nll`` can compute this model's loss without materialising all logits."""
    model = unwrap_model(model)
    head = model.get_output_embeddings()
    return head_transform(model.config) is not None and isinstance(head, nn.Linear)


def has_router_aux_loss(model: nn.Module) -> bool:
    """Whether the model is a mixture of experts with a load-balancing loss (Mixtral, Qwen-MoE, OLMoE...)."""
    config = unwrap_model(model).config
    return hasattr(config, "router_aux_loss_coef") and hasattr(config, "output_router_logits")


def causal_lm_nll(
    model: PreTrainedModel,
    input_ids: Tensor,
    labels: Tensor | None = None,
    attention_mask: Tensor | None = None,
    chunk_size: int | None = 128,
    position_ids: Tensor | None = None,
    compile: bool = False,
) -> tuple[Tensor, Tensor]:
    """Sum of next-token negative log-likelihoods and the number of target tokens.

    Position ``t`` predicts ``labels[:, t + 1]``; label ``-100`` is not a target. A packed block of
    ``T`` tokens therefore has ``T - 1`` targets. With ``chunk_size``, the vocabulary projection and
    the loss run over ``batch_size * chunk_size`` rows (``chunk_size`` positions of each sequence, counted
    over the flattened ``(batch, position)`` rows) at a time in float32, so the full ``(B, T, V)`` float32
    logits (the usual evaluation OOM, transformers #15466) never exist at once, in evaluation or, since
    the gradients are computed chunk by chunk too, in training. ``model`` may be a ``peft`` ``PeftModel``.

    ``position_ids`` that restart at 0 mark packed examples (with ``attention_mask=None``): transformers then
    keeps attention inside each (a block-diagonal mask for eager and sdpa). ``flash_attention_2`` finds them
    only in a batch of one row, so for it the rows are joined into one (exact: each row's first label is
    -100, and its padding continues its last example).
    """
    nll, n_targets, _ = causal_lm_loss(
        model, input_ids, labels, attention_mask, chunk_size, position_ids=position_ids, compile=compile
    )
    return nll, n_targets


def causal_lm_loss(
    model: PreTrainedModel,
    input_ids: Tensor,
    labels: Tensor | None = None,
    attention_mask: Tensor | None = None,
    chunk_size: int | None = 128,
    router_aux_loss: bool = False,
    position_ids: Tensor | None = None,
    compile: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``causal_lm_nll``'s two values and, with ``router_aux_loss`` on a mixture of experts, the model's own
    load-balancing loss (of its family's ``load_balancing_loss_func``, over the tokens ``attention_mask``
    keeps: padding does not enter it; else ``None``). ``compile``: the chunked head and loss run through
    ``torch.compile``.

    With ``position_ids`` (packed rows), ``attention_mask`` only marks the padding after each row's last
    example: it is not given to the model, which keeps attention inside each example from the position ids
    alone (transformers reads them only without a 2-D mask); the padding comes after every real token.
    """
    if labels is None:
        labels = input_ids
    if position_ids is not None and "flash" in str(getattr(model.config, "_attn_implementation", "")):
        input_ids, labels, position_ids = (x.reshape(1, -1) for x in (input_ids, labels, position_ids))
        attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
    targets = labels[:, 1:]
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
    n_targets = (targets != IGNORE_INDEX).sum()
    model_mask = attention_mask if position_ids is None else None
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": model_mask, "use_cache": False}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if router_aux_loss and has_router_aux_loss(model):
        kwargs["output_router_logits"] = True

    if chunk_size is None or not supports_chunked_loss(model):
        out = model(**kwargs)
        logits = out.logits[:, :-1].float()  # (B, T-1, V)
        nll = F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return nll, n_targets, router_loss(model, out, attention_mask, model_mask)

    hf_model = unwrap_model(model)  # LoRA layers sit inside it: its base_model runs through them
    aux = None
    if "output_router_logits" in kwargs:
        # The model's own forward computes its family's load-balancing loss; the head runs on one position
        # only, and the final hidden states are caught on the way (OPT-style models call base_model.decoder).
        caught: list[Tensor] = []

        def catch(module: nn.Module, args: Any, out: Any) -> None:  # None: the output goes on unchanged
            caught.append(out[0])

        inner = [
            m for m in (hf_model.base_model, getattr(hf_model.base_model, "decoder", None)) if m is not None
        ]
        hooks = [m.register_forward_hook(catch) for m in inner]
        try:
            aux = router_loss(model, model(**kwargs, logits_to_keep=1), attention_mask, model_mask)
        finally:
            for hook in hooks:
                hook.remove()
        hidden = caught[0]  # the innermost: OPT's decoder runs within its base_model
    else:
        hidden = hf_model.base_model(**kwargs)[0]
    hidden = hidden[:, :-1]  # (B, T-1, C): the positions that have a target
    head = hf_model.get_output_embeddings()
    rows = hidden.size(0) * chunk_size
    transform = head_transform(hf_model.config)
    nll = linear_cross_entropy(
        hidden.flatten(0, 1), head.weight, head.bias, targets.flatten(), rows, transform, compile
    )
    return nll, n_targets, aux


def router_loss(model: nn.Module, out: Any, mask: Tensor | None, model_mask: Tensor | None) -> Tensor | None:
    """A mixture of experts' load-balancing loss over the tokens of ``mask``: the one the model computed
    (``out.aux_loss``) when it was given that mask, else its family's ``load_balancing_loss_func`` (Mixtral,
    Qwen-MoE, OLMoE... each define one, with ``num_experts`` and ``num_experts_per_tok`` on the model)."""
    aux = getattr(out, "aux_loss", None)
    if aux is None or mask is None or mask is model_mask:
        return aux
    hf_model = unwrap_model(model)
    balancing = getattr(sys.modules[type(hf_model).__module__], "load_balancing_loss_func", None)
    if balancing is None or getattr(out, "router_logits", None) is None:
        return aux  # a family without the usual function: its own loss, padding included
    return balancing(out.router_logits, hf_model.num_experts, hf_model.num_experts_per_tok, mask)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    chunk_rows: int,
    transform: dict[str, float] | None = None,
    compile: bool = False,
) -> Tensor:
    """Summed ``cross_entropy(transform(hidden @ weight.T + bias), targets)``, ``chunk_rows`` rows a time.

    ``compile``: each chunk runs through one ``torch.compile`` graph (see :func:`compiled_chunk`).
    """
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows, transform, compile)


def _chunk_loss(
    h: Tensor,
    t: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    transform: dict[str, float],
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """One chunk's summed loss and, as needed, its gradients for ``h`` (n, C), ``weight`` (in ``h``'s dtype)
    and ``bias`` (float32). The gradient of the summed loss with respect to the logits is
    ``softmax - one_hot``."""
    logits = apply_head_transform(F.linear(h, weight, bias).float(), transform)  # (n, V)
    valid = t != IGNORE_INDEX
    t = torch.where(valid, t, 0)
    lse = torch.logsumexp(logits, dim=-1)  # (n,)
    loss = ((lse - logits.gather(1, t[:, None]).squeeze(1)) * valid).sum()
    if not (need_hidden or need_weight or need_bias):
        return loss, None, None, None
    # tanh' = 1 - tanh^2, read before the logits are overwritten (soft-capped heads only).
    capped = 1 - (logits / transform["softcap"]) ** 2 if "softcap" in transform else None
    grad_logits = logits.sub_(lse[:, None]).exp_()  # softmax, in place: (n, V)
    grad_logits.scatter_add_(1, t[:, None], -valid[:, None].to(grad_logits.dtype))
    grad_logits = chain_head_transform(grad_logits.mul_(valid[:, None]), capped, transform)
    grad_bias = grad_logits.sum(0) if need_bias else None  # float32
    grad_logits = grad_logits.to(h.dtype)
    grad_hidden = grad_logits @ weight if need_hidden else None
    grad_weight = grad_logits.t() @ h if need_weight else None
    return loss, grad_hidden, grad_weight, grad_bias


@functools.cache
def compiled_chunk() -> Callable[..., Any]:
    """:func:`_chunk_loss` compiled with ``torch.compile``, made once per process.

    Only the chunk is compiled, with its number of rows dynamic, and the loop over chunks stays in Python:
    a graph of the whole loop would unroll it and so be specialised to the sequence length, and padded
    fine-tuning batches change length almost every batch (transformers' own ``torch.compile`` advice is to
    pad to a few lengths; here nothing is padded). One graph then serves every chunk of every length: one
    for training, one for evaluation (and one for a chunk of a single row, a size dynamo specialises).
    """
    return torch.compile(_chunk_loss)


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of ``cross_entropy(hidden @ weight.T + bias, targets)``, ``chunk_rows`` rows at a time.

    When gradients are needed they are computed in the forward pass, chunk by chunk, so no chunk's float32
    logits outlive it: the ``(N, V)`` logits are neither materialised nor kept for the backward pass, in
    training as in evaluation. The backward pass only scales the stored gradients. The same matmuls as the
    plain path (the idea of Liger-Kernel's fused linear cross-entropy), with less memory traffic.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        chunk_rows: int,
        transform: dict[str, float] | None = None,
        compile: bool = False,
    ) -> Tensor:
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # The head's gradients are sums over all chunks: accumulated in float32 whatever the weights' dtype
        # (bf16-true would round the running sum to 8 bits of mantissa at every chunk), cast once in backward.
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        chunk = compiled_chunk() if compile else _chunk_loss
        for start in range(0, hidden.size(0), chunk_rows):
            h, t = hidden[start : start + chunk_rows], targets[start : start + chunk_rows]  # (n, C), (n,)
            if compile:  # one graph for every number of rows (the last chunk's, a smaller batch's)
                torch._dynamo.maybe_mark_dynamic(h, 0)
                torch._dynamo.maybe_mark_dynamic(t, 0)
            loss, g_hidden, g_weight, g_bias = chunk(
                h, t, weight, bias, transform or {}, need_hidden, need_weight, need_bias
            )
            total += loss
            if need_hidden:
                grad_hidden[start : start + chunk_rows] = g_hidden
            if need_weight:
                grad_weight += g_weight.float()
            if need_bias:
                grad_bias += g_bias
        ctx.needs = (need_hidden, need_weight, need_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: Tensor) -> tuple[Tensor | None, ...]:
        saved = iter(ctx.saved_tensors)
        grads = [
            (next(saved) * grad_total).to(dtype) if needed else None
            for needed, dtype in zip(ctx.needs, ctx.dtypes, strict=True)
        ]
        return (*grads, None, None, None, None)


def apply_head_transform(logits: Tensor, transform: dict[str, float]) -> Tensor:
    if "mul" in transform:
        logits = logits * transform["mul"]
    if "div" in transform:
        logits = logits / transform["div"]
    if "softcap" in transform:
        logits = torch.tanh(logits / transform["softcap"]) * transform["softcap"]
    return logits


def chain_head_transform(grad: Tensor, capped: Tensor | None, transform: dict[str, float]) -> Tensor:
    """The gradient with respect to the head's output, from that with respect to the transformed logits."""
    if capped is not None:
        grad = grad.mul_(capped)
    if "mul" in transform:
        grad = grad.mul_(transform["mul"])
    if "div" in transform:
        grad = grad.div_(transform["div"])
    return grad


class ExactSums(Metric):
    """A metric of float64 sums and int64 counts whose states keep their dtypes when its module is cast."""

    full_state_update = False

    def _apply(self, fn: Any, exclude_state: Any = ()) -> nn.Module:
        """Move the states with the module, but keep their dtypes (float64 sums, int64 counts).

        torchmetrics guards ``.half()``, ``.double()`` and the like against dtype changes, but not
        ``.to(dtype)``, which Lightning's ``bf16-true``/``16-true`` plugins call on the whole LightningModule:
        a sum would become bfloat16 (8-bit mantissa) and the perplexity wrong.
        """
        keep = [key for key in self._defaults if key not in exclude_state]
        this = super()._apply(fn, exclude_state=(*keep, *exclude_state))
        for key in keep:
            device = fn(getattr(this, key)).device  # where fn moves the state; not its dtype
            this._defaults[key] = this._defaults[key].to(device)
            setattr(this, key, getattr(this, key).to(device))
        return this


class TokenNLL(ExactSums):
    """Token-weighted mean negative log-likelihood over a whole split, summed across processes.

    ``compute`` returns the mean NLL; perplexity is its exponential. Written here because
    torchmetrics' ``Perplexity`` takes full logits, which the chunked loss never materialises.
    """

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
