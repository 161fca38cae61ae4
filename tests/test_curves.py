"""Pictures of runs: curves.png and run_summary.json at fit end, and the report of a run's versions."""

from __future__ import annotations

import csv
import json
import struct
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import run_cli, write_tiny_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lm_lightning.cli import cli_main
from lm_lightning.curves import CURVES_FILE, SUMMARY_FILE, Curves, CurvesCallback
from lm_lightning.report import read_version

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def _curves_callback(cli) -> CurvesCallback:
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, CurvesCallback)]
    return callback


def _tensorboard(folder: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _row(out: str, version: str) -> list[str]:
    (line,) = [line for line in out.splitlines() if line.startswith(f"| {version} ")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_curves_of_a_fit_and_the_report_of_two_versions(
    tmp_path, bpe_tokenizer_path, doc_texts, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    config = write_tiny_config(
        tmp_path, bpe_tokenizer_path, doc_texts, max_steps=4, val_check_interval=2, limit_val_batches=1,
        log_every_n_steps=1, num_sanity_val_steps=0, enable_progress_bar=False,
    )  # fmt: skip
    first = _curves_callback(cli_main(["fit", "--config", str(config)]))  # TensorBoard: version_0
    csv_logger = ["--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", "runs"]
    second = cli_main(["fit", "--config", str(config), "--trainer.max_steps", "2", *csv_logger,
                       "--trainer.logger.name", "tiny"])  # fmt: skip
    run = tmp_path / "runs" / "tiny"

    # The picture: a PNG of the figure's size, drawn from the values the logger received.
    png = run / "version_0" / CURVES_FILE
    assert first.written.resolve() == png and _png_size(png) == (800, 700)
    assert 20_000 < png.stat().st_size < 500_000
    logged = _tensorboard(run / "version_0")  # steps there count the steps done before the one logged
    curves = first.curves
    assert [s for s, _ in curves.train_loss] == [1, 2, 3, 4] and [s for s, _ in curves.val_perplexity] == [
        2,
        4,
    ]
    for name, tag in (("train_loss", "train/loss"), ("val_perplexity", "val/perplexity"), ("lr", "train/lr")):
        assert getattr(curves, name) == [(s + 1, pytest.approx(v, rel=1e-6)) for s, v in logged[tag]], name
    assert curves.lr[0][1] > curves.lr[-1][1] > 0  # the linear decay
    summary = json.loads((run / "version_0" / SUMMARY_FILE).read_text())
    assert summary["steps"] == 4 and summary["tokens"] == 4 * 4 * 32  # 4 steps of 4 blocks of 32 tokens
    assert summary["last_val_perplexity"] == pytest.approx(logged["val/perplexity"][-1][1], rel=1e-6)
    assert (
        summary["wall_seconds"] > 0 and summary["peak_rss_bytes"] > 50e6 and summary["precision"] == "32-true"
    )
    assert (run / "version_1" / CURVES_FILE).is_file()  # the CSV logger's folder
    assert _curves_callback(second).curves.train_loss[0] == curves.train_loss[0]  # same seed, same first step

    # The report: one row each, with the numbers of their own logs; the overlay reads the same series.
    assert read_version(run / "version_0").curves.train_loss == curves.train_loss
    assert run_cli(monkeypatch, "report", "runs/tiny", "--output", "report.md") == 0
    out = capsys.readouterr().out
    rows = {v: _row(out, v) for v in ("version_0", "version_1")}
    ppl = [v for _, v in logged["val/perplexity"]]
    with (run / "version_1" / "metrics.csv").open() as file:
        csv_ppl = [float(r["val/perplexity"]) for r in csv.DictReader(file) if r["val/perplexity"]]
    for version, values, steps, tokens in (
        ("version_0", ppl, "4", "512"),
        ("version_1", csv_ppl, "2", "256"),
    ):
        best, last, step_cell, token_cell, wall, memory, checkpoint, about = rows[version][1:]
        assert (best, last) == (f"{min(values):.2f}", f"{values[-1]:.2f}") and (step_cell, token_cell) == (
            steps,
            tokens,
        )
        assert wall.endswith(" s") and memory.endswith("GB (RSS)") and about.endswith("train.txt · 32-true")
        size = (run / version / "checkpoints" / "last.ckpt").stat().st_size
        assert checkpoint == f"{size / 1e6:.1f} MB"
    markdown = (tmp_path / "report.md").read_text()
    assert _row(markdown, "version_0") == rows["version_0"] and "![curves](report.png)" in markdown
    assert _png_size(tmp_path / "report.png") == (800, 700)
    (run / "version_1" / SUMMARY_FILE).unlink()  # as from an older run: the logs and Lightning's files alone
    fallback = read_version(run / "version_1").row()
    assert (
        fallback[1:7] == [*rows["version_1"][1:4], "-", "-", "-"]
        and fallback[-1] == "gpt2 · train.txt · 32-true"
    )
    assert run_cli(monkeypatch, "report", "runs/missing") == 2 and "no such folder" in capsys.readouterr().err


class _Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)


def _fake_trainer(log_dir: Path, is_global_zero: bool) -> SimpleNamespace:
    return SimpleNamespace(
        log_dir=str(log_dir), is_global_zero=is_global_zero, global_step=3, current_epoch=1, world_size=2,
        precision="bf16-mixed", datamodule=None, callback_metrics={},
    )  # fmt: skip


def _filled_callback(**kwargs) -> CurvesCallback:
    callback = CurvesCallback(**kwargs)
    callback.curves = Curves(
        train_loss=[(1, 3.0), (2, 2.5), (3, 2.25)],
        val_perplexity=[(3, 9.5)],
        lr=[(1, 1e-3), (2, 5e-4), (3, 0.0)],
    )
    return callback


def test_nothing_is_drawn_on_other_ranks_and_a_notebook_shows_the_picture(tmp_path, monkeypatch):
    other, zero = tmp_path / "rank1", tmp_path / "rank0"
    other.mkdir()
    _filled_callback().on_fit_end(_fake_trainer(other, is_global_zero=False), _Module())
    assert list(other.iterdir()) == []  # neither the picture nor the summary

    shown = []
    display = ModuleType("IPython.display")
    display.Image = lambda filename: ("image", filename)
    display.display = shown.append
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    callback = _filled_callback(show=True)
    callback.on_fit_end(_fake_trainer(zero, is_global_zero=True), _Module())
    assert shown == [("image", str(zero / CURVES_FILE))] and _png_size(zero / CURVES_FILE) == (800, 700)
    summary = json.loads((zero / SUMMARY_FILE).read_text())
    assert summary["model"] == "_Module · 8 params" and summary["last_val_perplexity"] == 9.5


def test_without_matplotlib_the_callback_says_once_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import matplotlib.figure fails
    callback = _filled_callback(show=True)
    with pytest.warns(UserWarning, match="pip install matplotlib") as warned:
        for _ in range(2):
            callback.on_fit_end(_fake_trainer(tmp_path, is_global_zero=True), _Module())
    assert len([w for w in warned if "matplotlib" in str(w.message)]) == 1
    assert callback.written is None and not (tmp_path / CURVES_FILE).exists()
    assert (tmp_path / SUMMARY_FILE).is_file()  # what the report needs still gets written
