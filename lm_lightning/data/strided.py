"""Sliding-window (strided) evaluation: the Hugging Face guide "Perplexity of fixed-length models".

The split's tokens, concatenated, are read in windows of ``block_size`` tokens starting every ``stride``
tokens; in each window only the tokens no earlier window scored are targets, the others are context. So
every token but the first is scored exactly once, each with at least ``block_size - stride`` tokens of
context (as many as there are before it, near the start). With ``stride == block_size`` the windows are the
disjoint blocks of the default evaluation, and the number is the same.

Written here rather than copied from the guide: its loop counts one token too few per overlapping window
(``num_valid_tokens - batch_size`` assumes each window's first target has no prediction, true only of the
first window), which biases its mean; here each window's targets are its labels after the shift, counted
exactly by the loss.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lm_lightning.data.formats import IGNORE_INDEX


def strided_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, n_context)`` per window: ``stream[begin:end]`` is read, its first ``n_context`` tokens
    are context only. Every token ``1 .. n_tokens - 1`` is a target of exactly one window."""
    if not 1 <= stride <= window:
        raise ValueError(
            f"eval_stride={stride} must be in [1, block_size={window}]: a larger stride would skip tokens."
        )
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        if begin and end - max(prev_end, begin + 1) < 1:  # nothing new to score
            break
        windows.append((begin, end, max(prev_end - begin, 0)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


class StridedWindows(Dataset):
    """Windows over a 1-D token tensor, each ``{"input_ids", "labels"}`` (labels -100 on the context)."""

    def __init__(self, tokens: Tensor, window: int, stride: int) -> None:
        self.tokens = tokens
        self.windows = strided_windows(len(tokens), window, stride)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        begin, end, n_context = self.windows[i]
        ids = self.tokens[begin:end].long()
        labels = ids.clone()
        labels[:n_context] = IGNORE_INDEX  # labels[t] is position t-1's target: the shift is the loss's
        return {"input_ids": ids, "labels": labels}


def split_stream(blocks: Dataset, tail: Tensor) -> Tensor:
    """A split's whole token stream: its cached blocks, concatenated, and the tail after the last one."""
    ids = [torch.as_tensor(blocks[:]["input_ids"]).reshape(-1)] if len(blocks) else []
    return torch.cat([*ids, tail.to(torch.int32)])
