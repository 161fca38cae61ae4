"""What every benchmark shares: paths, timing, child processes, peak memory, and the results file.

Each benchmark runs the reference and ours interleaved, in the same process tree, and appends one dated row
to ``docs/benchmarks.md`` under its own table (the line after ``<!-- rows:NAME -->``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lm_lightning.data.corpus import shared_data_dir

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "benchmarks.md"
SHARED_DATA = shared_data_dir()
WIKITEXT_FILES = {
    # The hub's train split is not available offline: its validation split stands in for train.
    "train": str(SHARED_DATA / "wikitext-2-v1" / "validation.parquet"),
    "validation": str(SHARED_DATA / "wikitext-2-v1" / "test.parquet"),
}
GPT2_TOKENIZER = str(SHARED_DATA / "gpt2-tokenizer")
_CHILD_MARKER = "BENCH-RESULT "


def require_shared_data() -> None:
    """Exit with the reason when the WikiText-2 files or the GPT-2 tokenizer are missing."""
    missing = [p for p in [*WIKITEXT_FILES.values(), GPT2_TOKENIZER] if not Path(p).exists()]
    if missing:
        sys.exit(f"missing {missing}: put the shared data in {SHARED_DATA} or set LM_LIGHTNING_SHARED_DATA.")


def set_threads(n: int) -> None:
    """Use ``n`` torch threads here and in child processes (0: torch's default, one per core).

    On this shared 2-core machine, 2 threads under load spin against other jobs' threads and run up to 4x
    slower than 1; both sides always get the same setting.
    """
    if n > 0:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(n)  # inherited by run_child's processes
        torch.set_num_threads(n)


def small_gpt2(n_positions: int = 1024, seed: int = 0, **overrides: Any) -> Any:
    """The benchmarks' model: a random GPT-2 of 4 layers, 256 wide, with GPT-2's 50,257-token vocabulary.

    The same seed gives the same weights in every process, so both sides compute the same function.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = {"n_layer": 4, "n_embd": 256, "n_head": 4, "vocab_size": 50257, "n_positions": n_positions}
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**{**config, **overrides}))


def wikitext_blocks(block_size: int, split: str) -> Any:
    """WikiText-2 packed into ``block_size`` blocks by ``CausalLMDataModule`` (cached), as one long tensor."""
    from lm_lightning import CausalLMDataModule

    dm = CausalLMDataModule(tokenizer=GPT2_TOKENIZER, data_files=WIKITEXT_FILES, block_size=block_size)
    dm.setup()
    return dm.datasets[split][:]["input_ids"]


def timed(fn: Callable[[], Any], sync: Callable[[], None] | None = None) -> tuple[Any, float]:
    """``fn()`` and its wall time in seconds (after ``sync()``, e.g. ``torch.cuda.synchronize``)."""
    start = time.perf_counter()
    result = fn()
    if sync is not None:
        sync()
    return result, time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    """The median, the summary of repeated timings on a shared (noisy) machine."""
    return statistics.median(values)


def rss_mib() -> float:
    """This process's resident memory now, in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident memory of this process (or the largest of its finished children), in MiB."""
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def run_child(script: str, args: Sequence[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python script args`` in a fresh process (its own peak memory) and return what it reported."""
    proc = subprocess.run(
        [sys.executable, script, *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith(_CHILD_MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(_CHILD_MARKER) :])


def run_children(jobs: Sequence[tuple[str, Sequence[str]]]) -> list[dict[str, Any]]:
    """Run ``python script args`` for each job at the same time (so they share one load) and return what
    each reported, in order."""
    procs = [
        subprocess.Popen(
            [sys.executable, script, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for script, args in jobs
    ]
    results = []
    for (script, args), proc in zip(jobs, procs, strict=True):
        stdout, stderr = proc.communicate()
        lines = [x for x in stdout.splitlines() if x.startswith(_CHILD_MARKER)]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{stderr[-3000:]}")
        results.append(json.loads(lines[-1][len(_CHILD_MARKER) :]))
    return results


def report_to_parent(result: dict[str, Any]) -> None:
    """Print a child's result where ``run_child`` finds it."""
    # On a line of its own: a progress bar on stdout leaves its last frame without a newline on a pipe.
    print("\n" + _CHILD_MARKER + json.dumps(result), flush=True)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: how busy the shared machine was."""
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def machine() -> str:
    """OS, CPU count and model, and the GPU when one is visible."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs ({cpu})"
    import torch

    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text


def versions() -> str:
    """Versions of Python and the libraries that decide the timings."""
    import datasets
    import lightning
    import tokenizers
    import torch
    import transformers

    libs = {"torch": torch, "lightning": lightning, "transformers": transformers}
    libs.update({"datasets": datasets, "tokenizers": tokenizers})
    return ", ".join(
        [f"python {platform.python_version()}"] + [f"{k} {m.__version__}" for k, m in libs.items()]
    )


def command() -> str:
    """The command line that ran this benchmark, from the repository root."""
    script = os.path.relpath(sys.argv[0], ROOT)
    return " ".join(["python", script, *sys.argv[1:]])


def verdict(ok: bool) -> str:
    """How a figure stands against its goal, as written in the results file."""
    return "met" if ok else "NOT met"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain-text table on stdout."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def append_row(name: str, figures: str, versus_goal: str, load: str) -> None:
    """Add a dated row to the table of benchmark ``name`` in ``docs/benchmarks.md``.

    Columns: date, command, figures, ratio against the goal, load average, machine, versions.
    """
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cells = [date, f"`{command()}`", figures, versus_goal, load, machine(), versions()]
    row = "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"
    lines = RESULTS.read_text().splitlines()
    marker = f"<!-- rows:{name} -->"
    if marker not in lines:
        raise ValueError(f"{RESULTS} has no line {marker!r}: add the table of benchmark {name!r} there.")
    at = lines.index(marker) + 1
    while at < len(lines) and lines[at].startswith("|"):
        at += 1
    lines.insert(at, row)
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"appended a row to {os.path.relpath(RESULTS, ROOT)}")
