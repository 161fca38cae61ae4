"""AdamW step time on CPU: fused kernels vs for-each (what 16-mixed with clipping falls back to) vs for-loop.

GPT-2-like tensor mixes (wide matrices plus small vectors) of about 4.7 M and 18.9 M parameters, random
gradients, ``clip_grad_norm_(1.0)`` before each step as in training; the three optimizers interleaved, the
first round discarded, median step time reported.

    python bench/optimizer.py                 # 1 torch thread
    python bench/optimizer.py --threads 2 --rounds 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py` from the repository root

import torch  # noqa: E402

from bench import common  # noqa: E402

KINDS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "forloop": {"foreach": False}}


def shapes_for(n_params: int, width: int) -> list[tuple[int, ...]]:
    """A block's tensor shapes (attention, MLP, norms, biases) repeated until ``n_params`` is reached."""
    block = [(width, 3 * width), (width, width), (width, 4 * width), (4 * width, width)]
    block += [(width,), (width,), (3 * width,), (4 * width,)]
    shapes: list[tuple[int, ...]] = []
    while sum(torch.Size(s).numel() for s in shapes) < n_params:
        shapes += block
    return shapes


def step_times(shapes: list[tuple[int, ...]], rounds: int) -> dict[str, float]:
    """Median seconds of one AdamW step per kind."""
    params, optimizers = {}, {}
    for kind, flags in KINDS.items():
        torch.manual_seed(0)
        params[kind] = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
        for p in params[kind]:
            p.grad = torch.randn_like(p) * 1e-3
        optimizers[kind] = torch.optim.AdamW(params[kind], lr=1e-4, **flags)
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for r in range(rounds + 1):
        for kind, optimizer in optimizers.items():
            torch.nn.utils.clip_grad_norm_(params[kind], 1.0)
            start = time.perf_counter()
            optimizer.step()
            if r:  # the first round allocates the moments
                times[kind].append(time.perf_counter() - start)
    return {kind: statistics.median(v) for kind, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per optimizer")
    args = parser.parse_args()
    common.set_threads(args.threads)
    parts = []
    for n_params, width in ((4_000_000, 256), (16_000_000, 512)):
        shapes = shapes_for(n_params, width)
        total = sum(torch.Size(s).numel() for s in shapes)
        t = step_times(shapes, args.rounds)
        parts.append(
            f"{total / 1e6:.1f} M parameters: fused {t['fused'] * 1e3:.1f} ms, "
            f"foreach {t['foreach'] * 1e3:.1f} ms, for-loop {t['forloop'] * 1e3:.1f} ms "
            f"(foreach / fused: {t['foreach'] / t['fused']:.1f}x)"
        )
        print(parts[-1], flush=True)
    figures = f"AdamW step on CPU, {args.threads} thread(s): " + "; ".join(parts)
    common.append_row(
        "optimizer", figures, "fused used unless a GradScaler meets clipping", common.load_average()
    )


if __name__ == "__main__":
    main()
