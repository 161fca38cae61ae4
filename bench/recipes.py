"""Every offline recipe, run one after another from a fresh cache, into ``docs/results.md``.

Each recipe is the README's own commands, run as child processes (``python -m lm_lightning ...``) in a new
work folder (``runs/`` and a fresh ``HF_DATASETS_CACHE`` in it, so tokenizing and caching are part of the
times; ``configs`` is a link to the repository's). For each command: the validation perplexity after each
epoch (read from the run's own TensorBoard events, as ``python -m lm_lightning report`` reads them), the wall
time of the process, its peak resident memory (``os.wait4``'s rusage of that child), the size of
``last.ckpt``, and the load average before and after; for each fit, the ``curves.png`` it drew, copied
beside the results file (``docs/results/``). The machine and library versions head the file.

    python bench/recipes.py                   # the full recipes: about 10 minutes on 2 quiet CPU cores
    python bench/recipes.py --smoke           # every recipe a few steps long, into WORKDIR/results.md

``--smoke`` proves the script (a few batches per epoch, one epoch); its figures mean nothing, so it writes
into the work folder unless ``--output`` says otherwise. Run the full script on a quiet machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py` from the repository root

from bench import common  # noqa: E402
from lm_lightning.curves import CURVES_FILE, format_duration  # noqa: E402
from lm_lightning.report import read_version  # noqa: E402

# The README's LoRA example: the standard library's `email` package as training text, `json` as validation.
STDLIB_TEXT = """
import email, json, pathlib
for name, package in (('train', email), ('valid', json)):
    files = sorted(pathlib.Path(package.__file__).parent.glob('*.py'))
    pathlib.Path(f'stdlib-{name}.txt').write_text('\\n'.join(f.read_text() for f in files))
"""
LORA_DATA = [
    "--data.data_files.train", "stdlib-train.txt", "--data.data_files.validation", "stdlib-valid.txt",
    "--data.block_size", "128", "--data.batch_size", "16",
]  # fmt: skip
QUICKSTART = ["--config", "configs/quickstart.yaml"]
QUICKSTART_EXPORT = "runs/quickstart/version_0/hf_model"
SMOKE_FIT = [
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "4",
    "--trainer.limit_val_batches",
    "2",
]
SMOKE_EVAL = ["--trainer.limit_val_batches", "2"]


@dataclass
class Step:
    """One command of a recipe: ``fit`` or ``validate`` (a row of results), or ``python`` (a set-up step)."""

    label: str
    verb: str
    args: list[str]


@dataclass
class Recipe:
    name: str
    title: str
    about: str
    steps: list[Step] = field(default_factory=list)


RECIPES = [
    Recipe(
        "quickstart", "Quickstart: a small GPT-2 from scratch on the Python docs",
        "`configs/quickstart.yaml`: 4 layers, 256 wide, a 1,024-token BPE tokenizer trained on the corpus, "
        "6 epochs.",
        [Step("fit", "fit", QUICKSTART)],
    ),
    Recipe(
        "sft-python-docs", "Supervised fine-tuning on python-docs-qa",
        "`configs/sft-python-docs.yaml`: the quickstart's export fine-tuned on 170 prompt-completion pairs, "
        "packed; the perplexity is over the completions.",
        [
            Step("before fine-tuning", "validate", ["--config", "configs/sft-python-docs.yaml"]),
            Step("fit", "fit", ["--config", "configs/sft-python-docs.yaml"]),
        ],
    ),
    Recipe(
        "quickstart-lora", "LoRA on the quickstart's model, on Python source code",
        "The README's LoRA example: rank-8 adapters on the quickstart's export, trained on the standard "
        "library's `email` package, validated on `json`.",
        [
            Step("prepare the text", "python", ["-c", STDLIB_TEXT]),
            Step("before LoRA", "validate", ["--model.model_name_or_path", QUICKSTART_EXPORT, *LORA_DATA]),
            Step("fit", "fit", [
                "--model.model_name_or_path", QUICKSTART_EXPORT, "--model.lora", "{r: 8}",
                "--model.learning_rate", "1e-3", "--model.export_dir", "true",
                *LORA_DATA,
                "--trainer.max_epochs", "2", "--trainer.logger.init_args.name", "quickstart-lora",
            ]),
        ],
    ),
    Recipe(
        "strided", "Strided validation of the quickstart's model",
        "`--data.eval_stride N`: windows of 128 tokens every N, each token scored once with at least "
        "128 - N tokens of context (the README's table).",
        [
            Step("disjoint blocks", "validate", [*QUICKSTART, "--ckpt_path", "last"]),
            Step("stride 64", "validate", [*QUICKSTART, "--ckpt_path", "last", "--data.eval_stride", "64"]),
            Step("stride 32", "validate", [*QUICKSTART, "--ckpt_path", "last", "--data.eval_stride", "32"]),
        ],
    ),
    Recipe(
        "dpo-python-docs", "Preference tuning (DPO) on python-docs-pairs",
        "`configs/dpo-python-docs.yaml`: the SFT recipe's export tuned with LoRA on 170 preference pairs "
        "(the reference: the model with its adapters disabled); the perplexity is of the chosen answers, "
        "and the held-out reward accuracy is the DPO figure.",
        [
            Step("before DPO", "validate", ["--config", "configs/dpo-python-docs.yaml"]),
            Step("fit", "fit", ["--config", "configs/dpo-python-docs.yaml"]),
        ],
    ),
]  # fmt: skip
REWARD_ACCURACY = "val/rewards/accuracy"  # logged by objective='dpo' runs


@dataclass
class Result:
    step: Step
    command: str
    seconds: float
    peak_rss_bytes: int
    load_before: str
    load_after: str
    perplexities: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)  # DPO's held-out reward accuracy
    checkpoint_bytes: int | None = None
    picture: str | None = None


def run_step(
    step: Step, recipe: Recipe, workdir: Path, env: dict[str, str], smoke: bool, images: Path
) -> Result:
    """Run one command in ``workdir`` and read what it logged."""
    if step.verb == "python":
        argv, shown = [sys.executable, *step.args], f'python -c "{step.args[1].rstrip()}\n"'
    else:
        extra = (SMOKE_FIT if step.verb == "fit" else SMOKE_EVAL) if smoke else []
        argv = [sys.executable, "-m", "lm_lightning", step.verb, *step.args, *extra]
        shown = " ".join(["python -m lm_lightning", step.verb, *(_quote(a) for a in step.args + extra)])
    log = workdir / "logs" / f"{recipe.name}-{step.label.replace(' ', '-')}.log"
    log.parent.mkdir(exist_ok=True)
    print(f"[{recipe.name}] {shown}", flush=True)
    load_before, start = common.load_average(), time.time()
    with log.open("w") as out:
        proc = subprocess.Popen(argv, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (peak RSS), not all children's
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.time() - start
    if proc.returncode != 0:
        sys.exit(
            f"{shown} failed with exit code {proc.returncode}; its output: {log}\n{log.read_text()[-3000:]}"
        )
    result = Result(step, shown, seconds, usage.ru_maxrss * 1024, load_before, common.load_average())
    written = [p for p in (workdir / "runs").rglob("events.out.tfevents.*") if p.stat().st_mtime >= start - 1]
    if step.verb == "fit":
        (folder,) = {p.parent for p in written}
        version = read_version(folder)
        result.perplexities, result.checkpoint_bytes = version.perplexities, version.checkpoint_bytes
        result.accuracies = _scalars(folder, REWARD_ACCURACY)
        if (folder / CURVES_FILE).is_file():
            images.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / CURVES_FILE, images / f"{recipe.name}.png")
            result.picture = f"{images.name}/{recipe.name}.png"
    elif step.verb == "validate":
        (events,) = written
        result.perplexities = read_version(events.parent).perplexities[-1:]  # the file this command wrote
        result.accuracies = _scalars(events.parent, REWARD_ACCURACY)[-1:]
    return result


def _scalars(folder: Path, tag: str) -> list[float]:
    """The values of ``tag`` in the TensorBoard events of ``folder``, in step order ([] if absent)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return [s.value for s in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def _quote(arg: str) -> str:
    return f"'{arg}'" if any(c in arg for c in " {}[]*") else arg


def markdown(results: dict[str, list[Result]], smoke: bool, started: str) -> str:
    """``docs/results.md``: a summary table, then each recipe's commands, figures and picture."""
    lines = [
        "# Results of the offline recipes",
        "",
        f"Generated by `{common.command()}` on {started}; do not edit by hand, run the script again. Each "
        "recipe ran from a fresh data cache (tokenizing is part of its time), one command after another, in "
        "the order below (later recipes start from the quickstart's export).",
        "",
        f"- machine: {common.machine()}",
        f"- versions: {common.versions()}",
        "- wall time: the whole command (start-up, data, fit, checkpoints, export); peak memory: the peak "
        "resident memory of its process; checkpoint: `last.ckpt`; load: the load average (1/5/15 min) "
        "before and after the command.",
    ]
    if smoke:
        lines += ["", "**Smoke run** (`--smoke`: a few batches per recipe): these figures prove the script, "
                      "nothing else."]  # fmt: skip
    lines += [
        "",
        "| recipe | command | val/perplexity | wall time | peak memory | checkpoint | load |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        for r in rows:
            if r.step.verb != "python":
                lines.append(_row(name, r))
    for recipe in RECIPES:
        lines += ["", f"## {recipe.title}", "", recipe.about, "", "```bash"]
        lines += [r.command for r in results[recipe.name]] + ["```", ""]
        for r in results[recipe.name]:
            accuracy = ", ".join(f"{a:.2f}" for a in r.accuracies)
            if r.step.verb == "fit" and r.perplexities:
                epochs = ", ".join(f"{p:.1f}" for p in r.perplexities)
                lines.append(f"- fit: validation perplexity after each epoch {epochs}.")
                if accuracy:
                    lines.append(f"- fit: held-out reward accuracy after each epoch {accuracy}.")
            elif r.step.verb == "validate" and r.perplexities:
                lines.append(f"- {r.step.label}: validation perplexity {r.perplexities[-1]:.1f}.")
                if accuracy:
                    lines.append(f"- {r.step.label}: held-out reward accuracy {accuracy}.")
        lines += [f"\n![{recipe.name}]({r.picture})" for r in results[recipe.name] if r.picture]
    return "\n".join(lines) + "\n"


def _row(name: str, r: Result) -> str:
    ppl = ", ".join(f"{p:.1f}" for p in r.perplexities) or "-"
    ckpt = "-" if r.checkpoint_bytes is None else f"{r.checkpoint_bytes / 1e6:.1f} MB"
    cells = [f"{name}: {r.step.label}", f"`{r.command}`", ppl, format_duration(r.seconds),
             f"{r.peak_rss_bytes / 2**20:,.0f} MiB", ckpt, f"{r.load_before} → {r.load_after}"]  # fmt: skip
    return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few batches per recipe, to test the script")
    parser.add_argument("--workdir", help="the work folder (default: a new temporary one, kept)")
    parser.add_argument(
        "--output", help="the results file (default: docs/results.md; WORKDIR/results.md with --smoke)"
    )
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lm-lightning-recipes-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if (workdir / "runs").exists() or (workdir / "cache").exists():
        sys.exit(f"{workdir} already holds runs/ or cache/: give a new --workdir (the recipes start fresh).")
    (workdir / "configs").symlink_to(common.ROOT / "configs")
    output = Path(
        args.output or (workdir / "results.md" if args.smoke else common.ROOT / "docs" / "results.md")
    )
    env = {
        **os.environ,
        "HF_DATASETS_CACHE": str(workdir / "cache"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(common.ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        ),
    }
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    images = output.parent / "results"
    results = {r.name: [run_step(s, r, workdir, env, args.smoke, images) for s in r.steps] for r in RECIPES}
    text = markdown(results, args.smoke, started)
    output.write_text(text)
    print(text)
    print(f"wrote {output} (work folder: {workdir})")


if __name__ == "__main__":
    main()
