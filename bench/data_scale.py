"""Data preparation at scale: prepare time, peak memory and loader throughput as the corpus grows.

The corpus is WikiText-2 (the hub's validation split, 3,760 rows, 256,061 GPT-2 tokens) copied 1x, 4x, 16x
and 64x as that many Parquet shards; the validation split is WikiText-2's test split. Each size runs in a
fresh subprocess with a fresh ``HF_DATASETS_CACHE``, so the time includes ``load_dataset``'s Parquet -> Arrow
conversion, and ``ru_maxrss`` is that size's own peak resident memory (imports included; the baseline after
imports is reported beside it).

Also measured, per size: the training loader alone (blocks/s through ``train_dataloader()``, batch 8,
``num_workers=0``, tensors straight from the memory-mapped Arrow table), set against the blocks/s that a
GPT-2 124M step consumes on an H100 at 45% MFU (from the FLOPs formula the training callback uses).
``--step_batch N`` also times a training step of that model on this machine's CPU (slow: ~50 s per block).

    python bench/data_scale.py                        # prints the Markdown rows
    python bench/data_scale.py --append docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from lm_lightning.data.corpus import shared_data_dir

REPO = Path(__file__).resolve().parents[1]
SHARED = shared_data_dir()
WIKITEXT = SHARED / "wikitext-2-v1"
TOKENIZER = SHARED / "gpt2-tokenizer"
SECTION = "## Data preparation at scale"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class AnonPeak(threading.Thread):
    """Peak anonymous resident memory (``RssAnon``), sampled every 20 ms.

    ``ru_maxrss`` also counts the pages of memory-mapped Arrow files that were read (``RssFile``): page
    cache that the kernel reclaims under pressure, and that grows with the corpus by design. The
    anonymous part is what the process itself holds (Python objects, NumPy and Arrow buffers).
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_mb = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        self.peak_mb = max(self.peak_mb, int(line.split()[1]) / 1024)


def child_prepare(shards: str, cache: str, block_size: int, loader_blocks: int) -> dict:
    """One size, in its own process: prepare, then iterate the train loader."""
    from lm_lightning import CausalLMDataModule

    rss_start = _rss_mb()
    dm = CausalLMDataModule(
        tokenizer=str(TOKENIZER),
        data_files={"train": shards, "validation": str(WIKITEXT / "test.parquet")},
        block_size=block_size,
        batch_size=8,
        cache_dir=cache,
    )
    dm.tokenizer  # noqa: B018 - loaded before timing
    anon = AnonPeak()
    anon.start()
    t0 = time.perf_counter()
    dm.prepare_data()
    prepare_s = time.perf_counter() - t0
    anon.stop.set()
    rss_prepare = _rss_mb()
    dm.setup("fit")
    n_blocks = len(dm.datasets["train"])
    loader = dm.train_dataloader()
    t0 = time.perf_counter()
    seen = 0
    for batch in loader:
        seen += batch["input_ids"].shape[0]
        if seen >= loader_blocks:
            break
    loader_s = time.perf_counter() - t0
    return {
        "train_blocks": n_blocks,
        "prepare_s": prepare_s,
        "rss_start_mb": rss_start,
        "rss_peak_prepare_mb": rss_prepare,
        "anon_peak_prepare_mb": anon.peak_mb,
        "loader_blocks_per_s": seen / loader_s,
        "rss_peak_mb": _rss_mb(),
    }


def child_step(block_size: int, batch_size: int, steps: int) -> dict:
    """Seconds per training step (forward, backward, AdamW) of the GPT-2 124M shape, random weights."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lm_lightning.model.loss import causal_lm_nll

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_positions=max(block_size, 1024))).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 50257, (batch_size, block_size))
    times = []
    for _ in range(steps + 1):  # the first step is warm-up
        t0 = time.perf_counter()
        nll, n = causal_lm_nll(model, x)
        (nll / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    step_s = sorted(times[1:])[len(times[1:]) // 2]
    return {"step_s": step_s, "blocks_per_s": batch_size / step_s, "threads": torch.get_num_threads()}


def _run_child(args: list[str], env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--block_size", type=int, default=1024)
    parser.add_argument("--loader_blocks", type=int, default=2000, help="blocks read to time the loader")
    parser.add_argument(
        "--step_batch", type=int, default=0, help="also time a CPU training step of this batch (slow)"
    )
    parser.add_argument("--append", help="append the rows to this Markdown file, under its own section")
    parser.add_argument("--child", choices=["prepare", "step"], help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "prepare":
        print(json.dumps(child_prepare(args.shards, args.cache, args.block_size, args.loader_blocks)))
        return
    if args.child == "step":
        print(json.dumps(child_step(args.block_size, args.step_batch, steps=3)))
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="data_scale.") as tmp:
        for n in args.sizes:
            corpus = Path(tmp) / f"corpus{n}x"
            corpus.mkdir()
            for i in range(n):
                shutil.copy(WIKITEXT / "validation.parquet", corpus / f"part-{i:05d}.parquet")
            env = {**os.environ, "HF_DATASETS_CACHE": str(Path(tmp) / f"hf{n}x")}
            load = os.getloadavg()[0]
            result = _run_child(
                [
                    "--child",
                    "prepare",
                    "--cache",
                    str(Path(tmp) / f"cache{n}x"),
                    "--block_size",
                    str(args.block_size),
                    "--loader_blocks",
                    str(args.loader_blocks),
                    "--shards",
                    str(corpus / "*.parquet"),
                ],
                env,
            )
            result.update(size=n, tokens=n * 256061, load=load)
            rows.append(result)
            print(json.dumps(result), file=sys.stderr)
            shutil.rmtree(corpus)
            shutil.rmtree(Path(tmp) / f"hf{n}x", ignore_errors=True)
            shutil.rmtree(Path(tmp) / f"cache{n}x", ignore_errors=True)
        step = None
        if args.step_batch:
            step = _run_child(
                [
                    "--child",
                    "step",
                    "--block_size",
                    str(args.block_size),
                    "--step_batch",
                    str(args.step_batch),
                ],
                dict(os.environ),
            )

    lines = [
        f"`python bench/data_scale.py` ({time.strftime('%Y-%m-%d')}; CPU: {os.cpu_count()} cores shared with "
        "other jobs, load average at the start of each row given; GPT-2 tokenizer, block size "
        f"{args.block_size}, one tokenizing process; each size in a fresh process and a fresh cache).",
        "",
        "| corpus | train tokens | train blocks | prepare (s) | s per M tokens | x time vs previous "
        "| peak RSS (MB) | peak anonymous RSS (MB) | RSS after imports (MB) | loader (blocks/s) | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    prev = None
    for r in rows:
        ratio = (
            ""
            if prev is None
            else f"{r['prepare_s'] / prev['prepare_s']:.2f} (size x{r['size'] // prev['size']})"
        )
        lines.append(
            f"| WikiText-2 x{r['size']} | {r['tokens']:,} | {r['train_blocks']:,} | {r['prepare_s']:.1f} "
            f"| {r['prepare_s'] / (r['tokens'] / 1e6):.2f} | {ratio} | {r['rss_peak_mb']:.0f} "
            f"| {r['anon_peak_prepare_mb']:.0f} "
            f"| {r['rss_start_mb']:.0f} | {r['loader_blocks_per_s']:,.0f} | {r['load']:.1f} |"
        )
        prev = r
    growth = rows[-1]["rss_peak_mb"] - rows[0]["rss_peak_mb"]
    anon_growth = rows[-1]["anon_peak_prepare_mb"] - rows[0]["anon_peak_prepare_mb"]
    slowest = min(r["loader_blocks_per_s"] for r in rows)
    # What a GPU consumes: GPT-2 124M, blocks of block_size, at 45% MFU of an H100 SXM's bf16 dense peak
    # (Lightning's table), with the FLOPs formula the training callback uses.
    import torch
    from lightning.fabric.utilities.throughput import _CUDA_FLOPS
    from transformers import GPT2Config

    from lm_lightning.model.flops import training_flops_per_batch

    h100 = _CUDA_FLOPS["h100 sxm"][torch.bfloat16]
    per_block = training_flops_per_batch(GPT2Config(), 1, args.block_size)
    gpu_blocks = 0.45 * h100 / per_block
    lines += [
        "",
        f"Peak memory grows by {growth:.0f} MB from x{rows[0]['size']} to x{rows[-1]['size']} "
        f"(goal: under 100 MB); its anonymous part by {anon_growth:.0f} MB, the rest being pages of the "
        "memory-mapped Arrow files, reclaimable page cache. The loader alone gives "
        f"{slowest:,.0f} blocks/s at its slowest size, in one process; a GPT-2 124M training step at 45% MFU "
        f"on one H100 SXM ({h100 / 1e12:.0f} TFLOPs/s bf16 in Lightning's table, "
        f"{per_block / 1e12:.2f} TFLOPs per block of {args.block_size}) consumes {gpu_blocks:,.0f} blocks/s: "
        f"the loader has {slowest / gpu_blocks:.0f}x to spare before any DataLoader worker is added.",
    ]
    if step:
        lines.append(
            f"Measured here: one training step of that model (batch {args.step_batch} x {args.block_size}, "
            f"float32, {step['threads']} CPU threads) takes {step['step_s']:.1f} s, "
            f"{step['blocks_per_s']:.3f} blocks/s."
        )
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.append:
        path = Path(args.append)
        existing = path.read_text() if path.exists() else "# Benchmarks\n"
        if SECTION not in existing:
            existing = existing.rstrip("\n") + f"\n\n{SECTION}\n\n"
        path.write_text(existing.rstrip("\n") + "\n\n" + text)


if __name__ == "__main__":
    main()
