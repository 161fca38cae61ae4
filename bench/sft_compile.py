"""Fine-tuning throughput, eager and compiled (``compile=True``), on packed and unpacked rows.

Unpacked fine-tuning batches are right-padded to their longest row, so their length changes almost every
batch. Before, the compiled chunked loss was one graph per length (its Python chunk loop unrolled), and after
8 lengths dynamo hit its recompile limit and ran the rest eagerly; now one graph of one chunk serves every
length (``lm_lightning.model.loss.compiled_chunk``), and the blocks (``base_model.compile()``) go dynamic
after their second length. ``--pad-to-multiple N`` also times the other option, padding each batch to a
multiple of N (labels -100, attention mask 0: the same loss) so that fewer lengths exist.

The built-in ``python-docs-qa`` pairs (170), a 2,048-token BPE tokenizer trained on the Python docs, a random
GPT-2 of 4 layers, 256 wide, rows of at most 256 tokens, batch 8, AdamW, CPU float32, one torch thread. Each
mode trains one warm-up epoch (compilation happens there: its time is reported apart) and then the timed
epochs, from the same weights. Real tokens are the examples' own (not padding): the figure is real tokens per
second, and the graphs compiled are dynamo's count.

    python bench/sft_compile.py --repeats 2 --pad-to-multiple 64
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py` from the repository root

from bench import common  # noqa: E402


class PadToMultiple:
    """A collator's batches padded on to a multiple of ``multiple`` positions: the same loss."""

    def __init__(self, collate, multiple: int) -> None:
        self.collate, self.multiple = collate, multiple

    def __call__(self, rows):
        import torch
        import torch.nn.functional as F

        batch = self.collate(rows)
        extra = -batch["input_ids"].shape[1] % self.multiple
        pad = {"input_ids": 0, "labels": -100, "attention_mask": 0}
        for key, value in pad.items():
            batch[key] = F.pad(batch[key], (0, extra), value=value)
        if "position_ids" in batch:
            last = batch["position_ids"][:, -1:]
            batch["position_ids"] = torch.cat([batch["position_ids"], last + 1 + torch.arange(extra)], 1)
        return batch


def epoch(module, loader) -> float:
    """Seconds for one training epoch."""
    import torch

    optimizer = torch.optim.AdamW(module.model.parameters(), lr=1e-4)
    start = time.perf_counter()
    for batch in loader:
        nll, n, _ = module._nll(batch)
        (nll / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pad-to-multiple", type=int, default=0, help="also time compiled, padded batches")
    parser.add_argument("--no-record", action="store_true", help="do not append a row to docs/benchmarks.md")
    args = parser.parse_args()
    common.set_threads(args.threads)

    import torch
    from torch._dynamo.utils import counters

    from lm_lightning import CausalLMDataModule, CausalLMModule
    from lm_lightning.data.corpus import python_docs_texts
    from lm_lightning.data.tokenizer import train_bpe_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="bench-sft-compile-"))
    tokenizer = str(tmp / "bpe2048")
    train_bpe_tokenizer(python_docs_texts(), 2048, tokenizer)
    loaders, real_tokens = {}, {}
    for packing in (False, True):
        dm = CausalLMDataModule(
            tokenizer=tokenizer, corpus="python-docs-qa", block_size=args.block, batch_size=args.batch,
            packing=packing, validation_split_percentage=1, cache_dir=str(tmp / "cache"),
        )  # fmt: skip
        dm.prepare_data()
        dm.setup()
        loaders[packing] = dm.train_dataloader()
        real_tokens[packing] = sum(len(row["input_ids"]) for row in dm.datasets["train"])
    modes = ["eager", "compiled"] + (
        [f"compiled, padded to {args.pad_to_multiple}"] if args.pad_to_multiple else []
    )
    config = {"n_layer": 4, "n_head": 4, "n_embd": 256, "n_positions": args.block}
    rows, figures, loads = [], [], []
    for mode in modes:
        torch.manual_seed(0)
        module = CausalLMModule(model_config=config, tokenizer=tokenizer, compile=mode != "eager")
        module.configure_model()
        initial = {k: v.clone() for k, v in module.model.state_dict().items()}
        torch._dynamo.reset()
        counters.clear()
        for packing in (False, True):
            loader = loaders[packing]
            if mode.startswith("compiled, padded"):
                loader = torch.utils.data.DataLoader(
                    loader.dataset,
                    batch_size=args.batch,
                    collate_fn=PadToMultiple(loader.collate_fn, args.pad_to_multiple),
                )
            module.model.load_state_dict(initial)
            first = epoch(module, loader)  # compiles
            times = [epoch(module, loader) for _ in range(args.repeats)]
            loads.append(common.load_average())
            rate = real_tokens[packing] / common.median(times)
            name = "packed" if packing else "unpacked"
            graphs = counters["stats"]["unique_graphs"]
            rows.append([mode, name, f"{first:.1f}", f"{common.median(times):.1f}", f"{rate:.0f}", graphs])
            figures.append(f"{mode} {name} {rate:.0f} real tok/s")
    common.print_table(
        ["mode", "rows", "warm-up epoch (s)", "epoch (s, median)", "real tok/s", "graphs so far"], rows
    )
    summary = (
        f"python-docs-qa ({real_tokens[True]:,} real train tokens), rows <= {args.block}, "
        f"batch {args.batch}, "
        f"4x256 GPT-2, vocab 2,048, cpu float32, {args.threads} torch thread(s), one epoch after a warm-up "
        f"(median of {args.repeats}): "
        + "; ".join(figures)
        + "; graphs compiled per mode (both row kinds): "
        + ", ".join(f"{r[0]} {r[5]}" for r in rows[1::2])
    )
    print(summary)
    if not args.no_record:
        common.append_row("sft_compile", summary, "no goal: a record", " ".join(loads))


if __name__ == "__main__":
    main()
