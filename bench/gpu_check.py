"""The GPU matrix in one command: precisions, compile, attention kernels, the non-finite check, MFU, QLoRA.

Run it whenever a session has a GPU (under 10 minutes on one H100); it appends one row per check to
``docs/benchmarks.md`` (section "GPU check"). A check that fails is recorded as a row with its error, and the
others still run. Random tokens, so no data set is needed; GPT-2 124M (12 layers, 768 wide, GPT-2's
vocabulary), blocks of 1024, batch 8, gradient clipping at 1.0, as ``fit`` runs on a GPU.

Checks:
  precision    bf16-mixed, 16-mixed (with its GradScaler) and bf16-true: tokens/s, which AdamW kernels were
               used, that clipping ran, and that the validation perplexity equals a float64 sum of the same
               model's NLL (relative difference <= 1e-4)
  compile      compile=True vs eager under bf16-mixed: tokens/s, the first step's loss against eager
  attention    sdpa, eager and flash_attention_2 (when installed): tokens/s
  nonfinite    the optimizer step's one host sync (its loss, the non-finite check, the interrupt signal,
               lm_lightning.model.step) vs none: tokens/s
  mfu          model FLOPs utilisation of GPT-2 124M, block 1024, bf16-mixed, eager and compiled, over the
               bf16 matmul peak measured on this GPU (goal >= 45% on an H100)
  qlora        bench/qlora_check.py: 4-bit NF4 base, adapters alone train, reload and merged export

    python bench/gpu_check.py                      # CUDA, all checks, rows appended
    python bench/gpu_check.py --device cpu         # the same matrix, tiny, on CPU: tests this script
    python bench/gpu_check.py --only precision mfu --no-append
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py` from the repository root

CHECKS = ("precision", "compile", "attention", "nonfinite", "mfu", "qlora")
GOAL_MFU = 0.45
GPT2_124M = {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257}
TINY = {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 512, "bos_token_id": 0, "eos_token_id": 0}
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


class Setup:
    """Sizes and device of one run of the matrix."""

    def __init__(self, device: str, steps: int) -> None:
        self.device = device
        self.tiny = device == "cpu"
        self.model = TINY if self.tiny else GPT2_124M
        self.block = 64 if self.tiny else 1024
        self.batch = 4 if self.tiny else 8
        self.warmup = 2
        self.steps = steps

    def loader(self, n_batches: int, seed: int) -> Any:
        import torch
        from torch.utils.data import DataLoader

        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, self.model["vocab_size"], (n_batches * self.batch, self.block), generator=g)
        rows = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in ids]
        return DataLoader(rows, batch_size=self.batch)


def step_timer(setup: Setup) -> Any:
    """A callback: tokens per second between the end of step ``warmup`` and the last step; per-step losses."""
    import lightning as L
    import torch

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.marks: dict[int, float] = {}
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if setup.device == "cuda":
                torch.cuda.synchronize()  # the step's queued kernels belong to it
            self.marks[trainer.global_step] = time.perf_counter()
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss))

        def tokens_per_s(self) -> float:
            first, last = setup.warmup, setup.warmup + setup.steps
            return setup.steps * setup.batch * setup.block / (self.marks[last] - self.marks[first])

    return StepTimer()


def fit(setup: Setup, precision: str = "bf16-mixed", **module_kwargs: Any) -> tuple[Any, Any, Any]:
    """Train warm-up + timed steps with clipping at 1.0; the module, trainer and timer."""
    import lightning as L
    from lightning.pytorch.plugins.precision import MixedPrecision

    from lm_lightning import CausalLMModule

    config = {**setup.model, "n_positions": setup.block, **module_kwargs.pop("model_config", {})}
    module = CausalLMModule(model_config=config, learning_rate=1e-4, lr_scheduler="constant", **module_kwargs)
    timer = step_timer(setup)
    kwargs: dict[str, Any] = {"precision": precision}
    if precision == "16-mixed" and setup.device == "cpu":
        kwargs = {"plugins": [MixedPrecision("16-mixed", "cpu")]}  # fp16 autocast + GradScaler on CPU
    trainer = L.Trainer(
        accelerator=setup.device,
        devices=1,
        max_steps=setup.warmup + setup.steps,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        **kwargs,
    )
    trainer.fit(module, setup.loader(setup.warmup + setup.steps, seed=0))
    return module, trainer, timer


def check_precision(setup: Setup) -> list[tuple[str, str]]:
    import torch

    from lm_lightning.model.loss import causal_lm_nll

    rows = []
    for precision in ("bf16-mixed", "16-mixed", "bf16-true"):
        module, trainer, timer = fit(setup, precision)
        optimizer = trainer.optimizers[0]
        kernels = "fused" if optimizer.defaults.get("fused") else "foreach"
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = f", loss scale {scaler.get_scale():g}" if scaler is not None else ""
        val = setup.loader(2, seed=1)
        ppl = trainer.validate(module, val, verbose=False)[0]["val/perplexity"]
        state_dtype = module.val_nll.nll_sum.dtype
        module.eval()
        total, count = 0.0, 0
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            for batch in val:
                batch = {k: v.to(module.device) for k, v in batch.items()}
                nll, n = causal_lm_nll(
                    module.model, batch["input_ids"], attention_mask=batch["attention_mask"]
                )
                total, count = total + float(nll.double()), count + int(n)
        rel = abs(ppl - math.exp(total / count)) / math.exp(total / count)
        finite = all(math.isfinite(x) for x in timer.losses)
        ok = finite and rel <= 1e-4 and state_dtype == torch.float64
        figures = (
            f"{precision}: {timer.tokens_per_s():,.0f} tok/s, AdamW {kernels}{scale}, clipping 1.0, losses "
            f"{timer.losses[0]:.3f} -> {timer.losses[-1]:.3f}, val perplexity {ppl:.2f} vs float64 sum "
            f"(rel {rel:.1e}), metric state {state_dtype}"
        )
        rows.append((figures, f"finite, exact perplexity, float64 state: {verdict(ok)}"))
    return rows


def check_compile(setup: Setup) -> list[tuple[str, str]]:
    runs = {}
    for compiled in (False, True):
        _, _, timer = fit(setup, "bf16-mixed", compile=compiled, model_config=NO_DROPOUT)
        runs[compiled] = timer
    eager, comp = runs[False], runs[True]
    rel = abs(comp.losses[0] - eager.losses[0]) / abs(eager.losses[0])
    speedup = comp.tokens_per_s() / eager.tokens_per_s()
    figures = (
        f"compile=True, bf16-mixed: {comp.tokens_per_s():,.0f} tok/s vs eager {eager.tokens_per_s():,.0f} "
        f"({speedup:.2f}x); first-step loss rel diff {rel:.1e}"
    )
    return [(figures, f"first-step loss within 1e-2 of eager (bf16 autocast): {verdict(rel <= 1e-2)}")]


def check_attention(setup: Setup) -> list[tuple[str, str]]:
    kinds = ["sdpa", "eager"]
    if importlib.util.find_spec("flash_attn") is not None:
        kinds.append("flash_attention_2")
    rates = {}
    for kind in kinds:
        _, _, timer = fit(setup, "bf16-mixed", attn_implementation=kind)
        rates[kind] = timer.tokens_per_s()
    figures = "bf16-mixed attention: " + ", ".join(f"{k} {r:,.0f} tok/s" for k, r in rates.items())
    if "flash_attention_2" not in rates:
        figures += "; flash_attention_2 not installed (flash_attn missing)"
    return [(figures, f"sdpa {rates['sdpa'] / rates['eager']:.2f}x eager")]


def check_nonfinite(setup: Setup) -> list[tuple[str, str]]:
    from lm_lightning.model.step import StepLoss

    checked = fit(setup, "bf16-mixed")[2].tokens_per_s()
    original = StepLoss.finish
    StepLoss.finish = lambda self, *args, **kwargs: self.reset()  # no sync: no loss read, nothing checked
    try:
        unchecked = fit(setup, "bf16-mixed")[2].tokens_per_s()
    finally:
        StepLoss.finish = original
    figures = (
        f"the step's one host sync (loss, non-finite check, interrupt) {checked:,.0f} tok/s vs none "
        f"{unchecked:,.0f} tok/s (the most that syncing every N steps could gain)"
    )
    return [(figures, f"the sync costs {1 - checked / unchecked:.1%} of throughput")]


def check_mfu(setup: Setup) -> list[tuple[str, str]]:
    from transformers import GPT2Config

    from lm_lightning.model.flops import training_flops_per_token

    if setup.device == "cuda":
        from bench.train_throughput import bf16_matmul_peak

        peak, where = bf16_matmul_peak("cuda"), "bf16 matmul measured on this GPU"
    else:
        peak, where = 1e12, "a nominal 1 TFLOP/s (CPU dry run: no MFU figure)"
    per_token = training_flops_per_token(GPT2Config(n_positions=setup.block, **setup.model), setup.block)
    rows = []
    for compiled in (False, True):
        rate = fit(setup, "bf16-mixed", compile=compiled)[2].tokens_per_s()
        mfu = per_token * rate / peak
        figures = (
            f"MFU, {'compiled' if compiled else 'eager'}, bf16-mixed, block {setup.block}, "
            f"batch {setup.batch}: "
            f"{rate:,.0f} tok/s = {mfu:.1%} of {peak / 1e12:.0f} TFLOP/s ({where})"
        )
        rows.append((figures, f"goal >= {GOAL_MFU:.0%}: {verdict(mfu >= GOAL_MFU)}"))
    return rows


def check_qlora(setup: Setup) -> list[tuple[str, str]]:
    try:
        import lm_lightning.model.lora  # noqa: F401  (LoRA came with another change)
        from bench.qlora_check import qlora_check
    except ImportError:
        print("QLoRA: not available in this build")
        return [("QLoRA: not available in this build (no lm_lightning.model.lora)", "not run")]
    if setup.device != "cuda":
        return [
            ("QLoRA: needs a CUDA GPU and bitsandbytes (bench/qlora_check.py); not run on CPU", "not run")
        ]
    figures = qlora_check()  # raises AssertionError on the first check that fails: a failed row
    return [
        (f"QLoRA (bench/qlora_check.py): {figures}", "4-bit base, adapters train, exact reload, merge: met")
    ]


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def run_checks(setup: Setup, names: list[str]) -> list[tuple[str, str]]:
    """Every check's rows; a check that raises becomes a row with its error."""
    import torch

    rows: list[tuple[str, str]] = []
    for name in names:
        check: Callable[[Setup], list[tuple[str, str]]] = globals()[f"check_{name}"]
        start = time.perf_counter()
        try:
            new = check(setup)
        except Exception as err:  # recorded, and the matrix goes on
            traceback.print_exc()
            new = [(f"{name}: FAILED with {type(err).__name__}: {str(err).splitlines()[0][:300]}", "failed")]
        if setup.device == "cuda":
            torch.cuda.empty_cache()
        for figures, versus in new:
            print(f"[{name} {time.perf_counter() - start:.0f} s] {figures}\n  -> {versus}", flush=True)
        rows += [(f"{setup.device}: {figures}", versus) for figures, versus in new]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument(
        "--dry-run", action="store_true", help="same as --device cpu: the matrix, tiny, on CPU"
    )
    parser.add_argument("--only", nargs="+", choices=CHECKS, default=list(CHECKS), help="checks to run")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run (CPU: 3)")
    parser.add_argument(
        "--no-append", action="store_true", help="print the rows, leave docs/benchmarks.md alone"
    )
    args = parser.parse_args()
    device = "cpu" if args.dry_run else args.device
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("No CUDA GPU here: run this in a session with a GPU, or --device cpu to test the script.")
    setup = Setup(device, 3 if device == "cpu" else args.steps)
    if device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}", flush=True)
    else:
        torch.set_num_threads(1)
    rows = run_checks(setup, args.only)
    if args.no_append:
        return
    from bench import common

    for figures, versus in rows:
        common.append_row("gpu_check", figures, versus, common.load_average())


if __name__ == "__main__":
    main()
