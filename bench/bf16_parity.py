"""Learning parity of ``bf16-mixed`` against ``32-true`` on CPU: the final validation perplexity of the same
run, from the same start (the same seed, so the same initial weights and the same order of batches), in each
precision, through the CLI as a user runs it. Also the wall time of each fit.

Two suites: ``quickstart`` (``configs/quickstart.yaml`` as shipped, its sampling callback
included) and ``wikitext`` (the benchmarks' model, a random GPT-2 of 4 layers, 256 wide, with GPT-2's
50,257-token vocabulary, on WikiText-2 blocks of 256, batch 8, lr 1e-3 cosine, ``--steps`` optimizer steps,
then one validation over ``--val-batches`` batches). Both precisions run at the same time, each in its own
process with ``--threads`` torch threads, so that both see the same load (``--one-at-a-time``: one after the
other, for the wall time of each alone). Goal: bf16-mixed's final
perplexity within 2% of 32-true's.

    python bench/bf16_parity.py --suite quickstart [--one-at-a-time]
    python bench/bf16_parity.py --suite wikitext --steps 60 --val-batches 16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py` from the repository root

from bench import common  # noqa: E402

GOAL_RELATIVE = 0.02
PRECISIONS = ("32-true", "bf16-mixed")
QUICKSTART_DATA = dict(
    corpus="python-docs",
    train_tokenizer_vocab_size=1024,
    block_size=128,
    validation_split_percentage=10,
    batch_size=16,
    eos_between_texts=False,
)  # configs/quickstart.yaml's data section: prepared once, before both fits, so they share the cache


def cli_args(suite: str, precision: str, out_dir: str, opts: dict) -> list[str]:
    """The ``fit`` command line of ``suite`` in ``precision``, writing only under ``out_dir``."""
    common_args = [
        f"--trainer.precision={precision}",
        f"--trainer.logger.init_args.save_dir={out_dir}",
        "--trainer.enable_progress_bar=false",
    ]
    if suite == "quickstart":
        config = str(common.ROOT / "configs" / "quickstart.yaml")
        return ["fit", f"--config={config}", *common_args, f"--model.export_dir={out_dir}/hf_model"]
    model_config = {"model_type": "gpt2", "n_layer": 4, "n_head": 4, "n_embd": 256}
    model_config.update(n_positions=256, vocab_size=50257)
    return [
        "fit",
        "--seed_everything=42",
        f"--model.model_config={json.dumps(model_config)}",
        "--model.learning_rate=1e-3",
        "--model.lr_scheduler=cosine",
        "--model.warmup_ratio=0.05",
        f"--data.tokenizer={common.GPT2_TOKENIZER}",
        f"--data.data_files={json.dumps(common.WIKITEXT_FILES)}",
        "--data.block_size=256",
        "--data.batch_size=8",
        f"--trainer.max_steps={opts['steps']}",
        f"--trainer.val_check_interval={opts['steps']}",
        f"--trainer.limit_val_batches={opts['val_batches']}",
        "--trainer.num_sanity_val_steps=0",
        *common_args,
    ]


def child(suite: str, precision: str, opts: dict) -> None:
    """One fit in this process; reports its final ``val/perplexity`` and wall time."""
    common.set_threads(opts["threads"])
    from lm_lightning.cli import cli_main

    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        cli = cli_main(cli_args(suite, precision, out_dir, opts))
        seconds = time.perf_counter() - start
        ppl = float(cli.trainer.callback_metrics["val/perplexity"])
        common.report_to_parent({"perplexity": ppl, "seconds": seconds, "steps": cli.trainer.global_step})


def prepare(suite: str) -> None:
    """Tokenize (and for the quickstart, train its tokenizer) once, so neither timed fit pays for it."""
    from lm_lightning import CausalLMDataModule

    if suite == "quickstart":
        dm = CausalLMDataModule(**QUICKSTART_DATA)
    else:
        common.require_shared_data()
        dm = CausalLMDataModule(
            tokenizer=common.GPT2_TOKENIZER, data_files=common.WIKITEXT_FILES, block_size=256, batch_size=8
        )
    dm.prepare_data()
    dm.setup()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", choices=["quickstart", "wikitext"], default="quickstart")
    parser.add_argument("--steps", type=int, default=60, help="wikitext: optimizer steps")
    parser.add_argument("--val-batches", type=int, default=16, help="wikitext: validation batches of 8")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each fit")
    parser.add_argument(
        "--one-at-a-time", action="store_true", help="one fit after the other (wall times of each alone)"
    )
    parser.add_argument("--child", nargs=3, metavar=("SUITE", "PRECISION", "OPTIONS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], json.loads(args.child[2]))
        return
    opts = {"steps": args.steps, "val_batches": args.val_batches, "threads": args.threads}
    prepare(args.suite)
    load_before = common.load_average()
    jobs = [(__file__, ["--child", args.suite, p, json.dumps(opts)]) for p in PRECISIONS]
    if args.one_at_a_time:
        reported = [common.run_child(script, child_args) for script, child_args in jobs]
    else:
        reported = common.run_children(jobs)
    results = dict(zip(PRECISIONS, reported, strict=True))
    load = f"{load_before} {common.load_average()}"
    fp32, bf16 = results["32-true"], results["bf16-mixed"]
    relative = bf16["perplexity"] / fp32["perplexity"] - 1
    speedup = fp32["seconds"] / bf16["seconds"]
    common.print_table(
        ["precision", "final val perplexity", "fit wall s", "steps"],
        [[p, f"{r['perplexity']:.3f}", f"{r['seconds']:.0f}", r["steps"]] for p, r in results.items()],
    )
    setting = {
        "quickstart": "configs/quickstart.yaml as shipped",
        "wikitext": f"4x256 GPT-2 (vocab 50,257), WikiText-2 blocks of 256, batch 8, {args.steps} steps, "
        f"lr 1e-3 cosine, validation over {args.val_batches} batches",
    }[args.suite]
    figures = (
        f"{setting}, cpu, {args.threads} torch thread(s) each, "
        f"{'one after the other' if args.one_at_a_time else 'both at once'}: final val perplexity "
        f"32-true {fp32['perplexity']:.3f}, bf16-mixed {bf16['perplexity']:.3f} ({relative:+.2%}); fit wall "
        f"time 32-true {fp32['seconds']:.0f} s, bf16-mixed {bf16['seconds']:.0f} s ({speedup:.2f}x)"
    )
    versus = (
        f"perplexity within {GOAL_RELATIVE:.0%}: {common.verdict(abs(relative) <= GOAL_RELATIVE)}; "
        f"bf16-mixed {speedup:.2f}x faster"
    )
    print(f"{figures}\n  -> {versus}")
    common.append_row("bf16_parity", figures, versus, load)


if __name__ == "__main__":
    main()
