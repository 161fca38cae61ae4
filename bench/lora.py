"""LoRA against full fine-tuning with ``CausalLMModule``: peak training memory, step time, checkpoint size.

The benchmarks' model (a random GPT-2 of 4 layers, 256 wide, GPT-2's 50,257-token vocabulary; or GPT-2 small,
124 M, with ``--model gpt2-124m``) saved as a pretrained folder with the GPT-2 tokenizer, fine-tuned on
WikiText-2 blocks of 256 tokens, batch 8, AdamW, float32: all weights, or rank-8 LoRA adapters on ``c_attn``
(peft's default for GPT-2, alpha 16, dropout 0.05). Each side runs in its own fresh process, interleaved and
repeated: the median time of an optimizer step after warm-up steps, the peak resident memory above the memory
after the model is loaded (gradients, optimizer state, activations), and the size of a checkpoint written by
``trainer.save_checkpoint`` (weights or adapters, optimizer state, the model's config and tokenizer).

    python bench/lora.py                       # the small model
    python bench/lora.py --model gpt2-124m --steps 4 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py` from the repository root

from bench import common  # noqa: E402

GOAL_CKPT_SHARE = 0.05  # the goal for GPT-2 with r=8: a LoRA checkpoint under 5% of a full one
MODELS = {
    "small": {"n_layer": 4, "n_embd": 256, "n_head": 4},
    "gpt2-124m": {"n_layer": 12, "n_embd": 768, "n_head": 12},
}
LORA = {"r": 8, "alpha": 16, "dropout": 0.05}


def child(side: str, opts: dict) -> None:
    """Fine-tune with ``side`` (``full`` or ``lora``) in this process and report the figures."""
    import lightning as L
    import torch

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
        tokenizer=opts["folder"], data_files=common.WIKITEXT_FILES, block_size=opts["block"], batch_size=8
    )
    module = CausalLMModule(
        model_name_or_path=opts["folder"], lora=LORA if side == "lora" else None, learning_rate=1e-4
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
    module.configure_model()  # the model loaded before the baseline: the peak above it is training's
    baseline = common.rss_mib()
    trainer.fit(module, data)
    peak = common.peak_rss_mib() - baseline
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "last.ckpt"
        trainer.save_checkpoint(path)
        ckpt_bytes = os.path.getsize(path)
    trainable = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    common.report_to_parent(
        {"step_s": common.median(times), "peak_mib": peak, "ckpt_bytes": ckpt_bytes, "trainable": trainable}
    )
    del torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="small")
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=["full", "lora"])
    parser.add_argument("--opts")
    args = parser.parse_args()
    if args.child:
        return child(args.child, json.loads(args.opts))
    common.require_shared_data()
    with tempfile.TemporaryDirectory() as folder:
        from transformers import AutoTokenizer

        common.small_gpt2(n_positions=1024, **MODELS[args.model]).save_pretrained(folder)
        AutoTokenizer.from_pretrained(common.GPT2_TOKENIZER).save_pretrained(folder)
        opts = {k: getattr(args, k) for k in ("model", "block", "warmup", "steps", "threads")}
        opts["folder"] = folder
        results: dict[str, list[dict]] = {"full": [], "lora": []}
        loads = []
        for _ in range(args.repeats):
            for side in ("full", "lora"):
                loads.append(common.load_average())
                results[side].append(
                    common.run_child(__file__, ["--child", side, "--opts", json.dumps(opts)])
                )
    med = {
        side: {key: common.median([r[key] for r in runs]) for key in runs[0]}
        for side, runs in results.items()
    }
    full, lora = med["full"], med["lora"]
    rows = [
        [
            side,
            f"{m['trainable']:,.0f}",
            f"{m['step_s']:.3f}",
            f"{m['peak_mib']:.0f}",
            f"{m['ckpt_bytes']:,.0f}",
        ]
        for side, m in med.items()
    ]
    common.print_table(["side", "trainable", "step s", "peak MiB", "checkpoint bytes"], rows)
    share = lora["ckpt_bytes"] / full["ckpt_bytes"]
    figures = (
        f"{args.model}, block {args.block}, batch 8, fp32: full fine-tuning {full['trainable']:,.0f} "
        f"trainable, step {full['step_s']:.3f} s, peak +{full['peak_mib']:.0f} MiB, checkpoint "
        f"{full['ckpt_bytes']:,.0f} B; LoRA r=8 c_attn {lora['trainable']:,.0f} trainable, step "
        f"{lora['step_s']:.3f} s, peak +{lora['peak_mib']:.0f} MiB, checkpoint {lora['ckpt_bytes']:,.0f} B "
        f"(median of {args.repeats})"
    )
    speedup, memory = full["step_s"] / lora["step_s"], full["peak_mib"] / lora["peak_mib"]
    versus = (
        f"checkpoint {share:.2%} of full (goal < 5%: {common.verdict(share < GOAL_CKPT_SHARE)}); step "
        f"{speedup:.2f}x faster, peak memory {memory:.2f}x lower"
    )
    print(figures, "|", versus)
    common.append_row("lora", figures, versus, " ".join(loads))


if __name__ == "__main__":
    main()
