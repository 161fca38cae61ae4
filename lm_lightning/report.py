"""``python -m lm_lightning report runs/NAME``: one table of a run's versions, and their curves overlaid.

Everything is read from the run's own files: the logger's record (TensorBoard event files or the CSV
logger's ``metrics.csv``), the ``run_summary.json`` that ``CurvesCallback`` writes at the end of fit (wall
time, tokens, peak memory: what the logs lack), and the checkpoints folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from lm_lightning.curves import (
    SUMMARY_FILE,
    Curves,
    Series,
    describe_data,
    draw_curves,
    format_count,
    format_duration,
)
from lm_lightning.errors import RunError, report_and_exit

TAGS = {"train_loss": "train/loss", "val_perplexity": "val/perplexity", "lr": "train/lr"}
COLUMNS = [
    "version",
    "best val/perplexity",
    "last val/perplexity",
    "steps",
    "tokens",
    "wall time",
    "peak memory",
    "checkpoint",
    "model · data · precision",
]


@dataclass
class VersionResult:
    """One ``version_N`` folder of a run: its logged series and totals (``None`` where nothing records it)."""

    path: Path
    curves: Curves
    summary: dict[str, Any] = field(default_factory=dict)
    wall_seconds: float | None = None
    checkpoint_bytes: int | None = None

    @property
    def perplexities(self) -> list[float]:
        return [value for _, value in self.curves.val_perplexity]

    @property
    def best(self) -> float | None:
        return min(self.perplexities) if self.perplexities else self.summary.get("best_val_perplexity")

    @property
    def last(self) -> float | None:
        return self.perplexities[-1] if self.perplexities else self.summary.get("last_val_perplexity")

    @property
    def steps(self) -> int | None:
        if self.summary.get("steps") is not None:
            return int(self.summary["steps"])
        return self.curves.train_loss[-1][0] if self.curves.train_loss else None  # the last step logged

    @property
    def peak_memory(self) -> str:
        device, rss = self.summary.get("peak_device_bytes"), self.summary.get("peak_rss_bytes")
        if device is not None:
            return f"{device / 1e9:.2f} GB (GPU)"
        return f"{rss / 1e9:.2f} GB (RSS)" if rss is not None else "-"

    def row(self) -> list[str]:
        number = "{:.2f}".format
        about = [self.summary.get(key) for key in ("model", "data", "precision")]
        return [
            self.path.name,
            "-" if self.best is None else number(self.best),
            "-" if self.last is None else number(self.last),
            "-" if self.steps is None else f"{self.steps:,}",
            format_count(self.summary.get("tokens")),
            format_duration(self.wall_seconds),
            self.peak_memory,
            "-" if self.checkpoint_bytes is None else f"{self.checkpoint_bytes / 1e6:.1f} MB",
            " · ".join(str(a) for a in about if a) or "-",
        ]


def read_version(path: str | Path) -> VersionResult:
    """The logged series and totals of one version folder (``runs/NAME/version_N``)."""
    path = Path(path)
    series, wall_times = _read_events(path) if _event_files(path) else _read_csv(path)
    summary_path = path / SUMMARY_FILE
    summary = {**_described(path), **(json.loads(summary_path.read_text()) if summary_path.is_file() else {})}
    wall = summary.get("wall_seconds")
    if wall is None and len(wall_times) > 1:
        wall = max(wall_times) - min(wall_times)  # first to last logged value: fit's set-up not counted
    curves = Curves(label=f"{path.parent.name}/{path.name}", **series)
    return VersionResult(path, curves, summary, wall, checkpoint_bytes(path / "checkpoints"))


def _described(path: Path) -> dict[str, str]:
    """Model, data and precision from the files Lightning writes, for a version without a summary."""
    about = {}
    hparams = _yaml(path / "hparams.yaml")  # the module's and the data module's arguments
    if hparams:
        config = hparams.get("model_config")
        name = hparams.get("model_name_or_path") or hparams.get("config_name")
        if name is None and isinstance(config, dict):
            name = config.get("model_type", "gpt2")  # lm_lightning.model.build's default
        about["model"] = str(name or "model")
        about["data"] = describe_data(SimpleNamespace(hparams=hparams))
    precision = (_yaml(path / "config.yaml").get("trainer") or {}).get("precision")  # the CLI's config
    if precision is not None:
        about["precision"] = str(precision)
    return about


def _yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _event_files(path: Path) -> list[Path]:
    return sorted(path.glob("events.out.tfevents.*"))


def _read_events(path: Path) -> tuple[dict[str, Series], list[float]]:
    """TensorBoard's scalars of ``path`` (its own files, not its validate/ or test/ subfolders)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(path), size_guidance={"scalars": 0})  # 0: keep every value
    events.Reload()
    tags = set(events.Tags()["scalars"])
    series, wall_times = {}, []
    for name, tag in TAGS.items():
        scalars = events.Scalars(tag) if tag in tags else []
        series[name] = _by_step((s.step, s.value) for s in scalars)
        wall_times += [s.wall_time for s in scalars]
    return series, wall_times


def _read_csv(path: Path) -> tuple[dict[str, Series], list[float]]:
    """The CSV logger's ``metrics.csv`` (no wall times in it)."""
    file = path / "metrics.csv"
    rows = list(csv.DictReader(file.open())) if file.is_file() else []
    series = {
        name: _by_step((int(row["step"]), float(row[tag])) for row in rows if row.get(tag) not in (None, ""))
        for name, tag in TAGS.items()
    }
    return series, []


def _by_step(pairs: Any) -> Series:
    """One value per step, the last one written (a resumed fit logs its redone steps again), with ``step``
    the optimizer steps done: loggers record the steps done before the one logged, hence the ``+ 1``."""
    values = {int(step): float(value) for step, value in pairs}
    return [(step + 1, values[step]) for step in sorted(values)]


def checkpoint_bytes(folder: Path) -> int | None:
    """The size of ``last.ckpt`` (a file, or a sharded checkpoint folder), else of the largest checkpoint."""
    if not folder.is_dir():
        return None

    def size(path: Path) -> int:
        return (
            sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            if path.is_dir()
            else path.stat().st_size
        )

    last = folder / "last.ckpt"
    if last.exists():
        return size(last)
    sizes = [size(p) for p in folder.glob("*.ckpt")]
    return max(sizes) if sizes else None


def find_versions(run: str | Path) -> list[Path]:
    """``run`` itself when it is one version's folder, else its ``version_*`` folders by number."""
    run = Path(run)
    if not run.is_dir():
        raise RunError(f"report {run}: no such folder. Give a run's folder, such as runs/quickstart.")
    if _is_version(run):
        return [run]
    versions = [p for p in run.iterdir() if p.is_dir() and _is_version(p)]
    if not versions:
        raise RunError(
            f"report {run}: no logged versions in it (version_N folders holding TensorBoard events, "
            f"metrics.csv or {SUMMARY_FILE}). Give a run's folder, such as runs/quickstart."
        )
    return sorted(versions, key=_natural_key)


def _is_version(path: Path) -> bool:
    return bool(_event_files(path)) or (path / "metrics.csv").is_file() or (path / SUMMARY_FILE).is_file()


def _natural_key(path: Path) -> tuple[Any, ...]:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name))


def markdown_table(results: list[VersionResult]) -> str:
    """The results as a Markdown table, its columns padded so that it also reads as plain text."""
    rows = [COLUMNS, *(r.row() for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(rows[0]), line(["-" * w for w in widths]), *(line(row) for row in rows[1:])])


def report(runs: list[str], output: str | None = None, plot: str | None = None) -> str:
    """Print (and with ``output``, write as Markdown) the table of ``runs``' versions; draw their curves.

    Args:
        runs: Run folders (``runs/NAME``, every ``version_N`` in it) or single version folders.
        output: A Markdown file to write the table and the picture's link into.
        plot: Where to draw the versions' curves overlaid (default: beside ``output`` with a ``.png``
            suffix, else ``report.png`` in the first run's folder).
    """
    results = [read_version(v) for run in runs for v in find_versions(run)]
    if len({r.path.parent for r in results}) > 1:
        for r in results:
            r.curves.label = f"{r.path.parent.name}/{r.path.name}"
    else:
        for r in results:
            r.curves.label = r.path.name
    table = markdown_table(results)
    first = Path(runs[0])
    picture = Path(plot or (Path(output).with_suffix(".png") if output else first / "report.png"))
    drawn = draw_curves([r.curves for r in results], picture, title=", ".join(runs))
    print(table)
    print(f"Curves of {len(results)} version(s): {picture}" if drawn else "No curves: pip install matplotlib")
    if output:
        from lm_lightning.io import atomic_path

        link = f"\n![curves]({_relative(picture, Path(output).parent)})\n" if drawn else ""
        with atomic_path(output) as tmp:
            tmp.write_text(f"# {', '.join(runs)}\n\n{table}\n{link}")
        print(f"Wrote {output}")
    return table


def _relative(path: Path, start: Path) -> str:
    try:
        return str(path.resolve().relative_to(start.resolve()))
    except ValueError:
        return str(path.resolve())


def report_main(args: list[str]) -> None:
    """``report``: the table of a run's versions; a missing or empty folder exits with code 2."""
    parser = argparse.ArgumentParser(
        prog="python -m lm_lightning report", description=report.__doc__.splitlines()[0]
    )
    parser.add_argument(
        "runs", nargs="+", help="run folders (runs/NAME) or version folders (runs/NAME/version_N)"
    )
    parser.add_argument(
        "--output", help="also write the table as Markdown to this file, the picture beside it"
    )
    parser.add_argument(
        "--plot", help="where to draw the curves (default: beside --output, or RUN/report.png)"
    )
    parsed = parser.parse_args(args)
    try:
        report(parsed.runs, parsed.output, parsed.plot)
    except RunError as err:
        report_and_exit(err, 2)
