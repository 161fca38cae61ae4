"""Top-k and top-p (nucleus) filtering without sorting the whole vocabulary, identical to transformers'.

transformers' ``TopPLogitsWarper`` sorts every row's 50,257 logits at every step to find the cut; that sort is
most of a sampling step's cost, and batching does not share it. Here the candidates are the
``candidates`` most likely tokens (``torch.topk``), and the cut is found among them; for a flat row, among the
``tail_candidates`` least likely, whose mass is the ``1 - top_p`` removed. A row falls back to transformers'
own warper, with its full sort, when the candidates cannot decide it exactly: they hold less than ``top_p`` of
the mass (and the least likely ones less than ``1 - top_p``), the cut's cumulative probability lies within
``MARGIN`` of the threshold (where transformers' float32 rounding could fall either way), or logits tied at
the cut are kept or removed by the order of a sort.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

MARGIN = 1e-5
"""How far, relative to ``1 - top_p``, the cut's cumulative probability must lie from ``1 - top_p`` for the
candidates to decide it. The float32 cumulative sums transformers compares differ from the exact (float64)
ones by at most 6.6e-7 of their value in 50,257-token rows (flat, skewed and peaked, logits' spread 0.1 to 6;
the float32 sum of the softmax's denominator): 15 times that."""


class TopKTopPWarper(LogitsProcessor):
    """transformers' ``TemperatureLogitsWarper``, ``TopKLogitsWarper`` then ``TopPLogitsWarper`` (the order
    ``generate`` applies them in), the same processed scores bit for bit,
    without a full sort for rows whose ``candidates`` most likely (or ``tail_candidates`` least likely)
    tokens decide the top-p cut.

    Pass it to ``generate`` in a ``LogitsProcessorList`` with the generation config's ``temperature=1.0``,
    ``top_k=0`` and ``top_p=1.0``, so transformers does not apply them a second time (``generate_texts`` does
    both). The temperature is here because ``generate`` runs a custom processor before its own warpers.
    ``min_tokens_to_keep`` is what ``generate`` would pass: 1, or with beams the number of EOS ids + 1.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_tokens_to_keep: int = 1,
        candidates: int = 512,
        tail_candidates: int = 8192,
        filter_value: float = -float("inf"),
    ) -> None:
        if candidates < 1 or tail_candidates < 1:
            raise ValueError(
                f"candidates={candidates}, tail_candidates={tail_candidates}: both must be >= 1."
            )
        self.temperature = TemperatureLogitsWarper(temperature) if temperature != 1.0 else None
        # transformers' own checks of top_k, top_p and min_tokens_to_keep, and its fallback
        self.top_k = TopKLogitsWarper(top_k, filter_value, min_tokens_to_keep) if top_k > 0 else None
        self.top_p = TopPLogitsWarper(top_p, filter_value, min_tokens_to_keep) if top_p < 1.0 else None
        self.min_tokens_to_keep = min_tokens_to_keep
        self.candidates = candidates
        self.tail_candidates = tail_candidates
        self._bottom_first = False
        self.filter_value = filter_value
        self.rows = 0
        """Rows filtered by top-p so far, and of them, those filtered by transformers' full sort."""
        self.fallback_rows = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """The scores over the temperature, with the tokens outside the top-k and the nucleus set to
        ``filter_value``."""
        if self.temperature is not None:
            scores = self.temperature(input_ids, scores)
        if self.top_k is not None:
            scores = self.top_k(input_ids, scores)
        if self.top_p is None:
            return scores
        return self._top_p(input_ids, scores)

    def _top_p(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.rows += scores.shape[0]
        threshold = 1.0 - self.top_p.top_p
        margin = MARGIN * threshold
        # log of the softmax's denominator: float32 exponentials summed in float64 (to about 1e-7 of it)
        top = scores.amax(dim=-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        total = torch.exp(scores - top).sum(dim=-1, keepdim=True, dtype=torch.float64)
        log_total = top.double() + torch.log(total)  # (B, 1)
        # The side that decided more rows last time first: the steps of one generate call look alike.
        cuts = [self._cut_among_top, self._cut_among_bottom]
        if self._bottom_first:
            cuts.reverse()
        filtered, todo = None, torch.arange(scores.shape[0], device=scores.device)  # rows not decided yet
        for cut in cuts:
            if not todo.numel():
                break
            decided, rows_filtered = cut(scores[todo], log_total[todo], threshold, margin)
            if cut is cuts[0]:
                self._bottom_first = (cut == self._cut_among_bottom) == bool(decided.float().mean() >= 0.5)
            if filtered is None and bool(decided.all()):
                return rows_filtered  # the usual case: every row decided by the first side
            if filtered is None:
                filtered = scores.clone()
            filtered[todo[decided]] = rows_filtered[decided]
            todo = todo[~decided]
        if todo.numel():
            self.fallback_rows += todo.numel()
            filtered[todo] = self.top_p(input_ids[todo], scores[todo])
        return filtered

    def _cut_among_top(
        self, scores: torch.Tensor, log_total: torch.Tensor, threshold: float, margin: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows (a mask) whose ``candidates`` most likely tokens decide the cut, and the filtered scores.

        transformers keeps a token when the float32 sum of the probabilities up to it, in ascending order, is
        ``> 1 - top_p``: exactly, 1 minus the mass strictly above it. Peaked rows are decided here.
        """
        k = min(self.candidates, scores.shape[-1])
        values, _ = torch.topk(scores, k)  # (B, k), descending
        probs = torch.exp(values.double() - log_total)
        from_below = 1.0 - (torch.cumsum(probs, dim=-1) - probs)  # falls along the row
        n_kept = (from_below > threshold).sum(dim=-1)  # >= 1: from_below[:, 0] is about 1
        rows = torch.arange(scores.shape[0], device=scores.device)
        last_kept = from_below[rows, n_kept - 1]
        first_removed = from_below[rows, n_kept.clamp(max=k - 1)]
        decided = (n_kept < k) & (last_kept > threshold + margin) & (first_removed <= threshold - margin)
        n_keep = n_kept.clamp(min=self.min_tokens_to_keep)
        decided &= n_keep < k
        cut = values[rows, (n_keep - 1).clamp(max=k - 1)]
        decided &= values[rows, n_keep.clamp(max=k - 1)] < cut  # no tie at the cut: ">= cut" keeps n_keep
        return decided, scores.masked_fill(scores < cut[:, None], self.filter_value)

    def _cut_among_bottom(
        self, scores: torch.Tensor, log_total: torch.Tensor, threshold: float, margin: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same from the least likely tokens: the removed ones are those whose ascending sum is
        ``<= 1 - top_p``. Flat rows (an untrained model's, a high temperature's) are decided here."""
        vocab = scores.shape[-1]
        k = min(self.tail_candidates, vocab)
        values, _ = torch.topk(scores, k, largest=False)  # (B, k), ascending
        from_below = torch.cumsum(torch.exp(values.double() - log_total), dim=-1)
        n_removed = (from_below <= threshold).sum(dim=-1)
        rows = torch.arange(scores.shape[0], device=scores.device)
        last_removed = from_below[rows, (n_removed - 1).clamp(min=0)]
        first_kept = from_below[rows, n_removed.clamp(max=k - 1)]
        decided = (n_removed < k) & (first_kept > threshold + margin)
        decided &= (n_removed == 0) | (last_removed <= threshold - margin)
        decided &= vocab - n_removed >= self.min_tokens_to_keep
        cut = values[rows, (n_removed - 1).clamp(min=0)]
        decided &= (n_removed == 0) | (values[rows, n_removed.clamp(max=k - 1)] > cut)  # no tie at the cut
        removed = (scores <= cut[:, None]) & (n_removed > 0)[:, None]
        return decided, scores.masked_fill(removed, self.filter_value)
