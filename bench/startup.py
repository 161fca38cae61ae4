"""Start-up: ``import lightning``, ``import lm_lightning`` and ``python -m lm_lightning fit --help``, each in
a fresh process, interleaved, the minimum of ``--repeats`` runs (the least disturbed by other jobs).

Goals: ``import lm_lightning`` <= ``import lightning`` + 0.5 s; ``fit --help`` <= 1.5x ``import lightning``.

    python bench/startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py` from the repository root

from bench import common  # noqa: E402

GOAL_IMPORT_EXTRA_S = 0.5
GOAL_HELP_RATIO = 1.5
COMMANDS = {
    "import lightning": ["-c", "import lightning"],
    "import lm_lightning": ["-c", "import lm_lightning"],
    "fit --help": ["-m", "lm_lightning", "fit", "--help"],
    # no goal: what a training script pays (the module and data module, with transformers and datasets)
    "import the module and data": ["-c", "from lm_lightning import CausalLMDataModule, CausalLMModule"],
}


def wall_time(args: list[str]) -> float:
    """Seconds from starting ``python args`` to its exit (it must succeed)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, capture_output=True, cwd=common.ROOT)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each command; the minimum is reported"
    )
    args = parser.parse_args()
    for command in COMMANDS.values():
        wall_time(command)  # warm the file cache and the bytecode of every module once
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    loads = []
    for _ in range(args.repeats):
        for name, command in COMMANDS.items():
            times[name].append(wall_time(command))
        loads.append(common.load_average())
    best = {name: min(t) for name, t in times.items()}
    common.print_table(
        ["command", "min s", "runs s"],
        [[name, f"{best[name]:.2f}", " ".join(f"{t:.2f}" for t in ts)] for name, ts in times.items()],
    )
    base = best["import lightning"]
    extra, ratio = best["import lm_lightning"] - base, best["fit --help"] / base
    figures = (
        f"minimum of {args.repeats}: import lightning {base:.2f} s, import lm_lightning "
        f"{best['import lm_lightning']:.2f} s ({extra:+.2f} s), python -m lm_lightning fit --help "
        f"{best['fit --help']:.2f} s ({ratio:.3f}x import lightning), from lm_lightning import "
        f"CausalLMDataModule, CausalLMModule {best['import the module and data']:.2f} s"
    )
    versus = (
        f"import {extra:+.2f} s (goal <= +{GOAL_IMPORT_EXTRA_S} s: "
        f"{common.verdict(extra <= GOAL_IMPORT_EXTRA_S)}); "
        f"fit --help {ratio:.3f}x (goal <= {GOAL_HELP_RATIO}x: {common.verdict(ratio <= GOAL_HELP_RATIO)})"
    )
    print(f"{figures}\n  -> {versus}")
    common.append_row("startup", figures, versus, " ".join(loads))


if __name__ == "__main__":
    main()
