"""Data preparation: the notebook's ``map(tokenize)`` + ``map(group_texts)`` vs ``CausalLMDataModule``.

WikiText-2 (validation split as train, test split as validation), the real GPT-2 tokenizer, blocks of 512.
Each measurement runs in a fresh process with its own empty ``HF_DATASETS_CACHE`` (cold), so that neither
side reads the other's cache and peak memory is per side; the warm run reuses the cold run's cache. Timed
from after the heavy imports, tokenizer loading included.

    python bench/data_prep.py [--repeats 3] [--num-proc 1 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py` from the repository root

from bench import common  # noqa: E402

GOAL_COLD_SPEEDUP = 3.0
GOAL_WARM_SECONDS = 1.0


def child(side: str, num_proc: int, cache: str) -> None:
    """One measurement in this process: ``reference``, ``ours`` (cold or warm: whatever the cache holds)."""
    import datasets  # noqa: F401 - the heavy imports, before the clock starts
    import lightning  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from bench import reference
    from lm_lightning import CausalLMDataModule

    base_rss = common.rss_mib()
    result: dict = {}
    if side == "reference":
        blocks, seconds = common.timed(
            lambda: reference.prepare_blocks(common.GPT2_TOKENIZER, common.WIKITEXT_FILES, 512, num_proc)
        )
        result["blocks"] = {split: len(ds) for split, ds in blocks.items()}
    else:
        dm = CausalLMDataModule(
            tokenizer=common.GPT2_TOKENIZER,
            data_files=common.WIKITEXT_FILES,
            block_size=512,
            num_proc=num_proc,
            cache_dir=os.path.join(cache, "lm_lightning"),
        )

        def prepare_and_setup():
            dm.prepare_data()
            dm.setup("fit")

        _, seconds = common.timed(prepare_and_setup)
        result["blocks"] = {split: len(ds) for split, ds in dm.datasets.items()}
        # The tokenizer loads lazily, when the model needs it (also part of the reference's time above).
        result["tokenizer_seconds"] = common.timed(lambda: dm.tokenizer)[1]
    import resource

    result.update(
        seconds=seconds,
        peak_mib=common.peak_rss_mib() - base_rss,
        worker_peak_mib=common.peak_rss_mib(resource.RUSAGE_CHILDREN),
    )
    common.report_to_parent(result)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side; the median is reported")
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2], help="datasets.map processes")
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "NUM_PROC", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, num_proc, cache = args.child
        child(side, int(num_proc), cache)
        return
    common.require_shared_data()

    def run(side: str, num_proc: int, cache: str) -> dict:
        return common.run_child(
            __file__, ["--child", side, str(num_proc), cache], {"HF_DATASETS_CACHE": cache}
        )

    rows, summary = [], []
    for num_proc in args.num_proc:
        runs: dict[str, list[dict]] = {"reference": [], "ours cold": [], "ours warm": []}
        loads = []
        for _ in range(args.repeats):  # interleaved, so both sides see the same background load
            with tempfile.TemporaryDirectory() as ref_cache, tempfile.TemporaryDirectory() as our_cache:
                runs["reference"].append(run("reference", num_proc, ref_cache))
                runs["ours cold"].append(run("ours", num_proc, our_cache))
                runs["ours warm"].append(run("ours", num_proc, our_cache))
            loads.append(common.load_average())
        med = {k: common.median([r["seconds"] for r in v]) for k, v in runs.items()}
        peak = {k: common.median([r["peak_mib"] for r in v]) for k, v in runs.items()}
        worker = {k: max(r["worker_peak_mib"] for r in v) for k, v in runs.items()}
        speedup = med["reference"] / med["ours cold"]
        for name, values in runs.items():
            rows.append(
                [
                    num_proc,
                    name,
                    f"{med[name]:.2f}",
                    " ".join(f"{r['seconds']:.2f}" for r in values),
                    f"{peak[name]:.0f}",
                    f"{worker[name]:.0f}" if num_proc > 1 else "-",
                    values[0]["blocks"],
                ]
            )
        tok = common.median([r["tokenizer_seconds"] for r in runs["ours warm"]])
        cold_ok, warm_ok = speedup >= GOAL_COLD_SPEEDUP, med["ours warm"] < GOAL_WARM_SECONDS
        mem_ok = peak["ours cold"] <= peak["reference"]
        figures = (
            f"num_proc {num_proc}: reference {med['reference']:.2f} s, ours cold {med['ours cold']:.2f} s, "
            f"warm {med['ours warm']:.2f} s (+{tok:.2f} s when the tokenizer is then loaded); peak RSS over "
            f"the imports: reference {peak['reference']:.0f} MiB, ours cold {peak['ours cold']:.0f} MiB "
            f"(median of {args.repeats})"
        )
        versus = (
            f"cold {speedup:.2f}x (goal >= {GOAL_COLD_SPEEDUP:.0f}x: {common.verdict(cold_ok)}); warm "
            f"{common.verdict(warm_ok)} (< {GOAL_WARM_SECONDS:.0f} s); memory {common.verdict(mem_ok)} "
            "(not above the reference)"
        )
        summary.append((figures, versus, " ".join(loads)))

    common.print_table(
        ["num_proc", "side", "median s", "runs s", "peak MiB", "worker peak MiB", "blocks"], rows
    )
    for figures, versus, loads in summary:
        print(f"{figures}\n  -> {versus}; load {loads}")
        common.append_row("data_prep", figures, versus, loads)


if __name__ == "__main__":
    main()
