"""Training throughput: the notebook's ``transformers.Trainer`` vs ``lightning`` fit of ``CausalLMModule``,
eager and compiled (``compile=True``: the blocks and the chunked loss through inductor).

The same random GPT-2 (default: 4 layers, 256 wide, GPT-2's 50,257-token vocabulary), the same WikiText-2
blocks (256 tokens, batch 8, packed by ``CausalLMDataModule``), the same optimizer settings (AdamW, lr 2e-5,
weight decay 0.01, linear decay, gradient clipping at 1.0), in each precision (float32, and bf16-mixed:
``TrainingArguments(bf16=True)`` on the reference's side), and the two sides' defaults compared. Each side
runs in its own fresh process, interleaved and repeated: tokens per second over a fixed number of optimizer
steps after warm-up steps. Ours runs as the CLI would (TensorBoard logger, progress bar with tok/s), without
checkpoints, like the reference.

    python bench/train_throughput.py                       # CPU, float32 and bf16-mixed, both sides
    python bench/train_throughput.py --before /tmp/old     # also ours from another checkout, interleaved
    python bench/train_throughput.py --device cuda --model gpt2-124m --block 1024 --precision bf16-mixed

On a GPU it also reports model FLOPs utilisation: (6 N + 12 L T C) FLOPs per token (N parameters, L layers,
T tokens per block, C width: the matmuls of the forward and backward passes and of attention) times tokens
per second, over the peak this GPU measures for a bf16 matmul.
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

GOAL_SPEEDUP = 1.10
GOAL_SPEEDUP_COMPILED = 1.3
GOAL_MFU = 0.45
GOAL_DEFAULT = 1.8  # ours by default (bf16-mixed on a bf16 CPU) against transformers.Trainer by default
MODELS = {
    "small": {"n_layer": 4, "n_embd": 256, "n_head": 4},
    "gpt2-124m": {"n_layer": 12, "n_embd": 768, "n_head": 12},  # GPT2Config's defaults: GPT-2 small
}


def bf16_matmul_peak(device: str, n: int = 8192, iterations: int = 50) -> float:
    """FLOP/s of a large bf16 matmul on this GPU, measured, not from a table (nanoGPT PR #464)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iterations):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iterations / (time.perf_counter() - start)


class StepClock:
    """Wall time between the end of optimizer step ``warmup`` and the end of step ``warmup + steps``."""

    def __init__(self, warmup: int, steps: int, sync) -> None:
        self.marks = {warmup: None, warmup + steps: None}
        self.sync = sync

    def step_done(self, global_step: int) -> None:
        if global_step in self.marks:
            self.sync()  # the device's queued work belongs to the step (nanoGPT PR #527)
            self.marks[global_step] = time.perf_counter()

    def seconds(self) -> float:
        start, end = self.marks.values()
        if start is None or end is None:
            raise RuntimeError(f"the run stopped before these optimizer steps: {self.marks}")
        return end - start


def child(side: str, opts: dict) -> None:
    """Train ``side`` (``reference``, ``ours``, or ``compiled``: ours with ``compile=True``) for warm-up +
    measured steps in this process and report."""
    import lightning as L
    import torch

    common.set_threads(opts["threads"])
    device = opts["device"]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    clock = StepClock(opts["warmup"], opts["steps"], sync)
    max_steps = opts["warmup"] + opts["steps"]
    model = common.small_gpt2(n_positions=opts["block"], **MODELS[opts["model"]]).train()
    out_dir = tempfile.mkdtemp()
    if side == "reference":
        from transformers import TrainerCallback

        from bench import reference

        blocks = common.wikitext_blocks(opts["block"], "train")

        class Blocks(torch.utils.data.Dataset):
            def __len__(self):
                return len(blocks)

            def __getitem__(self, i):
                return {"input_ids": blocks[i], "labels": blocks[i]}

        class Clock(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                clock.step_done(state.global_step)

        precision = {"bf16-mixed": {"bf16": True}, "32-true": {}}[opts["precision"]]
        args = reference.training_arguments(out_dir, max_steps, use_cpu=device == "cpu", **precision)
        reference.trainer(model, args, Blocks(), callbacks=[Clock()]).train()
    else:
        from lightning.pytorch.loggers import TensorBoardLogger

        from lm_lightning import CausalLMDataModule, CausalLMModule, TokensPerSecondProgressBar

        class Clock(L.Callback):
            def on_train_batch_end(self, trainer, *args):
                clock.step_done(trainer.global_step)

        config = {**MODELS[opts["model"]], "vocab_size": 50257, "n_positions": opts["block"]}
        compiled = side == "compiled"
        module = CausalLMModule(
            model_config=config,
            tokenizer=common.GPT2_TOKENIZER,
            learning_rate=2e-5,
            weight_decay=0.01,
            compile=compiled,
        )  # the tokenizer as the CLI links it from the data module
        if compiled:
            model.base_model.compile()  # what configure_model does with compile=True (the loss: the module)
        module.model = model  # the reference's weights (configure_model keeps a model already set)
        data = CausalLMDataModule(
            tokenizer=common.GPT2_TOKENIZER,
            data_files=common.WIKITEXT_FILES,
            block_size=opts["block"],
            batch_size=8,
        )
        trainer = L.Trainer(
            accelerator=device,
            devices=1,
            precision=opts["precision"],
            max_steps=max_steps,
            gradient_clip_val=1.0,
            logger=TensorBoardLogger(out_dir),
            callbacks=[TokensPerSecondProgressBar(), Clock()],
            enable_checkpointing=False,
            limit_val_batches=0,
        )
        trainer.fit(module, data)
    tokens = opts["steps"] * 8 * opts["block"]
    n_params = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    common.report_to_parent({"tokens_per_s": tokens / clock.seconds(), "n_params": n_params})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", choices=list(MODELS), default="small")
    parser.add_argument("--block", type=int, default=256, help="tokens per block")
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=["32-true", "bf16-mixed"],
        default=["32-true", "bf16-mixed"],
        help="each side runs in each (transformers.Trainer: bf16=True for bf16-mixed)",
    )
    parser.add_argument("--warmup", type=int, default=3, help="optimizer steps before the clock starts")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps timed")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per side; median reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: one per core)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled side (inductor)")
    parser.add_argument(
        "--before",
        metavar="DIR",
        help="also time ours from the checkout DIR (the commit before a change, say), interleaved",
    )
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "OPTIONS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], json.loads(args.child[1]))
        return
    common.require_shared_data()
    opts = {k: getattr(args, k) for k in ("device", "model", "block", "warmup", "steps", "threads")}
    common.wikitext_blocks(args.block, "train")  # packs once into the cache, before any clock runs

    sides = ["reference", "ours"] + ([] if args.no_compile else ["compiled"])
    scripts = dict.fromkeys(sides, __file__)
    if args.before:  # that checkout's own script: it puts its own lm_lightning first on sys.path
        sides.append("before")
        scripts["before"] = str(Path(args.before) / "bench" / Path(__file__).name)
    runs: dict[tuple[str, str], list[dict]] = {(s, p): [] for p in args.precision for s in sides}
    loads = []
    for _ in range(args.repeats):
        for side, precision in runs:
            child_side = "ours" if side == "before" else side
            child_opts = json.dumps({**opts, "precision": precision})
            runs[side, precision].append(common.run_child(scripts[side], ["--child", child_side, child_opts]))
        loads.append(common.load_average())
    rate = {key: common.median([r["tokens_per_s"] for r in v]) for key, v in runs.items()}
    rows = [
        [side, precision, f"{rate[side, precision]:,.0f}", " ".join(f"{r['tokens_per_s']:,.0f}" for r in v)]
        for (side, precision), v in runs.items()
    ]
    common.print_table(["side", "precision", "median tok/s", "runs tok/s"], rows)

    n_params = next(iter(runs.values()))[0]["n_params"]
    setting = (
        f"{args.model} GPT-2 ({n_params / 1e6:.1f} M parameters), block {args.block}, batch 8, "
        f"{args.device}, "
        f"{args.threads or 'all'} torch thread(s), {args.steps} steps after {args.warmup}: "
    )
    figures = setting + "; ".join(
        f"{precision}: " + ", ".join(f"{side} {rate[side, precision]:,.0f} tok/s" for side in sides)
        for precision in args.precision
    )
    if args.before:
        figures += f" (before: ours from {Path(args.before).name})"
    goals = {"ours": GOAL_SPEEDUP if args.device == "cpu" else 1.0, "compiled": GOAL_SPEEDUP_COMPILED}
    verdicts = []
    for precision in args.precision:
        base = rate["reference", precision]
        for side, goal in goals.items():
            if (side, precision) in rate:
                ratio = rate[side, precision] / base
                ok = common.verdict(ratio >= goal)
                verdicts.append(f"{precision}: {side} {ratio:.2f}x the reference (goal >= {goal}: {ok})")
        if args.before:
            verdicts.append(
                f"{precision}: ours {rate['ours', precision] / rate['before', precision]:.2f}x before"
            )
    # What a user gets without setting a precision: ours resolves it from the hardware (bf16-mixed on a CPU
    # with AVX512-BF16 or AMX), transformers.Trainer trains in float32 on CPU unless told bf16=True.
    from lm_lightning.precision import resolve_precision

    ours_default, why = resolve_precision()
    theirs_default = "bf16-mixed" if args.device == "cuda" else "32-true"
    if ("ours", ours_default) in rate and ("reference", theirs_default) in rate:
        ratio = rate["ours", ours_default] / rate["reference", theirs_default]
        goal = GOAL_DEFAULT if ours_default != theirs_default else GOAL_SPEEDUP
        verdicts.append(
            f"defaults (ours {ours_default}, {why.split(';')[0]}; theirs {theirs_default}): "
            f"ours {ratio:.2f}x the reference (goal >= {goal}: {common.verdict(ratio >= goal)})"
        )
    versus = "; ".join(verdicts)
    if args.device == "cuda":
        import torch

        peak = bf16_matmul_peak("cuda")
        from transformers import GPT2Config

        from lm_lightning.model.flops import training_flops_per_token

        config = GPT2Config(vocab_size=50257, n_positions=args.block, **MODELS[args.model])
        per_token = training_flops_per_token(config, args.block)
        mfu = {f"{side} {precision}": per_token * r / peak for (side, precision), r in rate.items()}
        per_side = ", ".join(f"{side} {m:.1%}" for side, m in mfu.items())
        figures += (
            f"; MFU {per_side} of {peak / 1e12:.0f} TFLOP/s "
            f"(bf16 matmul measured on {torch.cuda.get_device_name()})"
        )
        best = max(m for side, m in mfu.items() if not side.startswith("reference"))
        versus += f"; MFU {best:.1%} (goal >= {GOAL_MFU:.0%}: {common.verdict(best >= GOAL_MFU)})"
    print(f"{figures}\n  -> {versus}")
    common.append_row("train_throughput", figures, versus, " ".join(loads))


if __name__ == "__main__":
    main()
