"""Fine-tuning throughput with and without packing: real (non-pad) tokens per second on CPU.

The built-in ``python-docs-qa`` prompt-completion pairs (170, 20 to 500 tokens) with a 2,048-token BPE
tokenizer trained on the Python docs, the quickstart's model shape (a random GPT-2 of 4 layers, 256 wide),
rows of at most 256 tokens, batch 8, AdamW, float32. Unpacked: one example a row, each batch right-padded to
its longest; packed: best-fit-decreasing rows with position ids restarting per example (the same loss, to
rounding; see tests/test_formats.py). Each repeat trains one epoch of each, interleaved, from the same
weights, in the order of the data module's seeded training shuffle; the real tokens are the same in both, so
the ratio of tokens per second is the ratio of epoch times.

    python bench/packing.py --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py` from the repository root

from bench import common  # noqa: E402


def epoch(module, loader) -> tuple[float, int]:
    """Seconds for one training epoch, and the tokens it processed (padding included)."""
    import torch

    optimizer = torch.optim.AdamW(module.model.parameters(), lr=1e-4)
    padded = 0
    start = time.perf_counter()
    for batch in loader:
        nll, n = module._nll(batch)
        (nll / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        padded += batch["input_ids"].numel()
    return time.perf_counter() - start, padded


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-record", action="store_true", help="do not append a row to docs/benchmarks.md")
    args = parser.parse_args()
    common.set_threads(args.threads)

    import torch

    from lm_lightning import CausalLMDataModule, CausalLMModule
    from lm_lightning.data.corpus import python_docs_texts
    from lm_lightning.data.tokenizer import train_bpe_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="bench-packing-"))
    tokenizer = str(tmp / "bpe2048")
    train_bpe_tokenizer(python_docs_texts(), 2048, tokenizer)
    loaders, real_tokens = {}, {}
    for packing in (False, True):
        dm = CausalLMDataModule(
            tokenizer=tokenizer,
            corpus="python-docs-qa",
            block_size=args.block,
            batch_size=args.batch,
            packing=packing,
            validation_split_percentage=1,
            cache_dir=str(tmp / "cache"),
        )
        dm.prepare_data()
        dm.setup()
        loaders[packing] = dm.train_dataloader()
        real_tokens[packing] = sum(len(row["input_ids"]) for row in dm.datasets["train"])
    assert real_tokens[False] == real_tokens[True], real_tokens  # the same tokens, differently arranged

    torch.manual_seed(0)
    config = {"n_layer": 4, "n_head": 4, "n_embd": 256, "n_positions": args.block}
    module = CausalLMModule(model_config=config, tokenizer=tokenizer)
    module.configure_model()
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    times: dict[bool, list[float]] = {False: [], True: []}
    padded: dict[bool, int] = {}
    loads = []
    for _ in range(args.repeats):
        for packing in (False, True):
            module.model.load_state_dict(initial)
            seconds, padded[packing] = epoch(module, loaders[packing])
            times[packing].append(seconds)
        loads.append(common.load_average())
    rate = {p: real_tokens[p] / common.median(times[p]) for p in times}
    fill = {p: real_tokens[p] / padded[p] for p in times}
    common.print_table(
        ["", "epoch (s, median)", "real tokens", "tokens processed", "real share", "real tok/s"],
        [
            [
                "packed" if p else "unpacked",
                f"{common.median(times[p]):.1f}",
                f"{real_tokens[p]:,}",
                f"{padded[p]:,}",
                f"{fill[p]:.1%}",
                f"{rate[p]:.0f}",
            ]
            for p in (False, True)
        ],
    )
    speedup = rate[True] / rate[False]
    figures = (
        f"python-docs-qa ({real_tokens[True]:,} real train tokens), rows <= {args.block}, "
        f"batch {args.batch}, "
        f"4x256 GPT-2, vocab 2,048, cpu float32, {args.threads} torch thread(s), one epoch (median of "
        f"{args.repeats}): unpacked {rate[False]:.0f} real tok/s ({fill[False]:.1%} of the tokens processed "
        f"are real), packed {rate[True]:.0f} real tok/s ({fill[True]:.1%} real)"
    )
    print(figures)
    if not args.no_record:
        versus = f"packed {speedup:.2f}x unpacked (no goal: a record)"
        common.append_row("packing", figures, versus, " ".join(loads))


if __name__ == "__main__":
    main()
