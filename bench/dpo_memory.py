"""Preference tuning (DPO): peak memory and step time of the three reference paths.

The benchmarks' model (a random GPT-2 of 4 layers, 256 wide, GPT-2's 50,257-token vocabulary) saved as a
pretrained folder with the GPT-2 tokenizer, tuned with ``--model.objective dpo`` on the built-in
``python-docs-pairs`` corpus (GPT-2 tokens, each side cut to 256), 4 pairs (8 sequences) a batch, AdamW,
float32, on CPU. The reference is a frozen copy (all weights train), precomputed log-probabilities (all
weights train, one model held), or the model with its LoRA adapters disabled (rank 8 on ``c_attn``: only the
adapters train, so the optimizer state is smaller too). Each path in its own fresh process, interleaved and
repeated: the peak resident memory above the memory after the imports and the data (the model, the reference,
gradients, optimizer state, activations), and the median step after a warm-up step.

    python bench/dpo_memory.py
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

PATHS = {
    "frozen copy": {},
    "precomputed": {"dpo": {"precompute_reference": True}},
    "lora": {"lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
}


def child(path: str, opts: dict) -> None:
    """A few DPO steps with the reference ``path`` in this process; report the peak memory and step time."""
    import lightning as L

    from lm_lightning import CausalLMDataModule, CausalLMModule

    common.set_threads(opts["threads"])
    times: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step > opts["warmup"]:
                times.append(time.perf_counter() - self.start)

    data = CausalLMDataModule(
        tokenizer=opts["folder"], corpus="python-docs-pairs", block_size=opts["block"], batch_size=4,
        cache_dir=opts["cache"],
    )  # fmt: skip
    module = CausalLMModule(
        model_name_or_path=opts["folder"], objective="dpo", learning_rate=1e-4, **PATHS[path]
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=opts["warmup"] + opts["steps"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[Clock()],
    )
    data.prepare_data()
    data.setup()
    baseline = common.rss_mib()  # imports and data: the peak above it is the models' and training's
    trainer.fit(module, data)
    common.report_to_parent({"step_s": common.median(times), "peak_mib": common.peak_rss_mib() - baseline})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=list(PATHS))
    parser.add_argument("--opts")
    args = parser.parse_args()
    if args.child:
        return child(args.child, json.loads(args.opts))
    common.require_shared_data()
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as cache:
        from transformers import AutoTokenizer

        model = common.small_gpt2(n_positions=1024)
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(common.GPT2_TOKENIZER).save_pretrained(folder)
        n_params = sum(p.numel() for p in model.parameters())
        opts = {k: getattr(args, k) for k in ("block", "warmup", "steps", "threads")}
        opts.update(folder=folder, cache=cache)
        results: dict[str, list[dict]] = {path: [] for path in PATHS}
        loads = []
        for _ in range(args.repeats):
            for path in PATHS:
                loads.append(common.load_average())
                results[path].append(
                    common.run_child(__file__, ["--child", path, "--opts", json.dumps(opts)])
                )
    med = {
        path: {key: common.median([r[key] for r in runs]) for key in runs[0]}
        for path, runs in results.items()
    }
    common.print_table(
        ["reference", "peak MiB", "step s"],
        [[path, f"{m['peak_mib']:.0f}", f"{m['step_s']:.3f}"] for path, m in med.items()],
    )
    figures = (
        f"small GPT-2 ({n_params / 1e6:.1f} M parameters, {n_params * 4 / 2**20:.0f} MiB in float32), "
        f"python-docs-pairs, sides <= {args.block} tokens, 4 pairs a batch, cpu 32-true, {args.steps} steps "
        "after 1: peak RSS above imports and data: "
        + ", ".join(
            f"{path} +{m['peak_mib']:.0f} MiB ({m['step_s']:.2f} s a step)" for path, m in med.items()
        )
        + f" (median of {args.repeats})"
    )
    copy, pre = med["frozen copy"]["peak_mib"], med["precomputed"]["peak_mib"]
    versus = f"precomputed holds {copy - pre:.0f} MiB less than the frozen copy (one model fewer: no goal)"
    print(figures, "|", versus)
    common.append_row("dpo_memory", figures, versus, " ".join(loads))


if __name__ == "__main__":
    main()
