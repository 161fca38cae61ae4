"""Evaluation memory: the reference's full float32 logits then the loss, vs ``causal_lm_nll`` in chunks.

A validation pass over WikiText-2 blocks (batch 8 x 512, the 50,257-token GPT-2 vocabulary) with a random
4-layer, 256-wide GPT-2, each side in its own fresh process: the peak resident memory above the memory held
before the pass (model and blocks loaded). Torch's CPU allocator returns large blocks to the OS, so the peak
RSS is the peak of live tensors. Also one training step (forward and backward) of each, for comparison.

    python bench/eval_memory.py [--batches 4]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py` from the repository root

from bench import common  # noqa: E402

GOAL_MEMORY_RATIO = 0.5
GOAL_PPL_RTOL = 1e-5
BATCH, BLOCK = 8, 512


def child(side: str, mode: str, batches: int) -> None:
    """One pass (``eval``) or one step (``train``) of ``reference`` or ``ours``, in this fresh process."""
    import torch

    from bench import reference
    from lm_lightning import TokenNLL, causal_lm_nll

    blocks = common.wikitext_blocks(BLOCK, "validation")[: batches * BATCH]
    model = common.small_gpt2(n_positions=BLOCK)
    model.train(mode == "train")
    before = common.rss_mib()
    high_water_before = common.peak_rss_mib()
    metric = TokenNLL()
    n_targets = torch.tensor(BATCH * (BLOCK - 1))  # per batch: every block is full
    for batch in blocks.split(BATCH):
        if mode == "train":
            if side == "reference":
                loss = model(input_ids=batch, labels=batch).loss
            else:
                nll, n = causal_lm_nll(model, batch)
                loss = nll / n
            loss.backward()
            metric.update(loss.detach() * n_targets, n_targets)
        elif side == "reference":
            metric.update(reference.eval_loss(model, batch) * n_targets, n_targets)
        else:
            with torch.no_grad():
                metric.update(*causal_lm_nll(model, batch))
    common.report_to_parent(
        {
            "perplexity": math.exp(metric.compute().item()),
            "peak_mib": common.peak_rss_mib() - before,
            "high_water_before_mib": high_water_before - before,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=4, help="validation batches of 8 x 512 per pass")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per side; the median is kept")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: one per core)")
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "MODE", "BATCHES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    common.require_shared_data()
    common.set_threads(args.threads)
    common.wikitext_blocks(BLOCK, "validation")  # packs once into the cache, outside the measured children

    results: dict[tuple[str, str], list[dict]] = {}
    loads = []
    for _ in range(args.repeats):
        for mode, batches in (("eval", args.batches), ("train", 1)):
            for side in ("reference", "ours"):
                out = common.run_child(__file__, ["--child", side, mode, str(batches)])
                results.setdefault((mode, side), []).append(out)
        loads.append(common.load_average())
    peak = {k: common.median([r["peak_mib"] for r in v]) for k, v in results.items()}
    ppl = {k: v[0]["perplexity"] for k, v in results.items()}
    rows = [
        [mode, side, f"{peak[mode, side]:.0f}", f"{ppl[mode, side]:.6f}"] for mode, side in sorted(results)
    ]
    common.print_table(["pass", "side", "peak MiB above the loaded model", "perplexity"], rows)

    ratio = peak["eval", "ours"] / peak["eval", "reference"]
    rel = abs(ppl["eval", "ours"] - ppl["eval", "reference"]) / ppl["eval", "reference"]
    train_ratio = peak["train", "ours"] / peak["train", "reference"]
    figures = (
        f"validation pass, {args.batches} batches of {BATCH} x {BLOCK}, vocab 50,257, 4x256 GPT-2: peak "
        f"above the model: reference {peak['eval', 'reference']:.0f} MiB, "
        f"ours {peak['eval', 'ours']:.0f} MiB; "
        f"perplexity {ppl['eval', 'reference']:.6f} vs {ppl['eval', 'ours']:.6f} (relative difference "
        f"{rel:.1e}); one training step: reference {peak['train', 'reference']:.0f} MiB, ours "
        f"{peak['train', 'ours']:.0f} MiB ({train_ratio:.2f}x)"
    )
    versus = (
        f"eval memory {ratio:.2f}x the reference (goal <= {GOAL_MEMORY_RATIO}: "
        f"{common.verdict(ratio <= GOAL_MEMORY_RATIO)}); perplexity within {GOAL_PPL_RTOL:.0e}: "
        f"{common.verdict(rel <= GOAL_PPL_RTOL)}"
    )
    print(f"{figures}\n  -> {versus}")
    common.append_row("eval_memory", figures, versus, " ".join(loads))


if __name__ == "__main__":
    main()
