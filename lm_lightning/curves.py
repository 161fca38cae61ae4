"""A picture of each run: the logged train loss, validation perplexity and learning rate, drawn at fit end.

``CurvesCallback`` keeps a copy of what the module logs (whatever the logger: TensorBoard, CSV, W&B or none)
and at the end of ``fit`` writes ``curves.png`` and ``run_summary.json`` into the run's folder
(``trainer.log_dir``, e.g. ``runs/NAME/version_N``) on global rank zero. ``draw_curves`` also draws several
runs overlaid, for ``python -m lm_lightning report``. matplotlib is imported only when drawing.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lm_lightning.data.examples import real_tokens
from lm_lightning.io import atomic_path

CURVES_FILE = "curves.png"
SUMMARY_FILE = "run_summary.json"
INSTALL_HINT = "pip install matplotlib"

Series = list[tuple[int, float]]  # (optimizer steps done, value)


@dataclass
class Curves:
    """One run's series, each a list of ``(step, value)`` with ``step`` the optimizer steps done."""

    label: str = ""
    train_loss: Series = field(default_factory=list)
    val_perplexity: Series = field(default_factory=list)
    lr: Series = field(default_factory=list)


def format_duration(seconds: float | None) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 04 min``; ``-`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_count(count: float | None) -> str:
    """``840``, ``33.4 K``, ``3.4 M``, ``1.2 B``; ``-`` when unknown."""
    if count is None:
        return "-"
    for scale, suffix in ((1e9, " B"), (1e6, " M"), (1e3, " K")):
        if abs(count) >= scale:
            return f"{count / scale:.1f}{suffix}"
    return f"{count:.0f}"


def smooth(values: Sequence[float], share: float = 0.04) -> list[float]:
    """A centred moving average over ``share`` of the run (at the ends, over what there is).

    Centred rather than an exponential average (TensorBoard's), which lags behind a falling loss.
    """
    half = int(len(values) * share) // 2
    sums = [0.0]
    for value in values:
        sums.append(sums[-1] + value)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append((sums[hi] - sums[lo]) / (hi - lo))
    return out


def matplotlib_classes() -> Any:
    """matplotlib's ``Figure``, Agg canvas and tick locator, or None when it is missing.

    No pyplot: no global figure state, and the notebook's own backend is left alone.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    return Figure, FigureCanvasAgg, MaxNLocator


def draw_curves(runs: Sequence[Curves], path: str | os.PathLike, title: str = "") -> bool:
    """Draw ``runs`` into the PNG ``path`` (written atomically); ``False`` when matplotlib is missing.

    Three panels sharing the step axis: train loss (smoothed, raw values faint), validation perplexity at each
    validation, and the learning rate. Several runs are overlaid in one colour each.
    """
    classes = matplotlib_classes()
    if classes is None:
        return False
    Figure, FigureCanvasAgg, MaxNLocator = classes
    fig = Figure(figsize=(8, 7), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, ppl_ax, lr_ax = fig.subplots(3, 1, sharex=True, height_ratios=[3, 2, 1])
    for i, run in enumerate(runs):
        color = f"C{i}"
        label = run.label if len(runs) > 1 else None
        if run.train_loss:
            steps, values = zip(*run.train_loss, strict=True)
            loss_ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            loss_ax.plot(steps, smooth(values), color=color, linewidth=1.8, label=label)
        if run.val_perplexity:
            steps, values = zip(*run.val_perplexity, strict=True)
            ppl_ax.plot(steps, values, color=color, marker="o", label=label)
            if len(runs) == 1 and len(values) <= 12:
                for step, value in run.val_perplexity:
                    ppl_ax.annotate(
                        f"{value:.1f}", (step, value), textcoords="offset points", xytext=(0, 6), ha="center",
                        fontsize=8,
                    )  # fmt: skip
        if run.lr:
            steps, values = zip(*run.lr, strict=True)
            lr_ax.plot(steps, values, color=color, linewidth=1.2)
    loss_ax.set_ylabel("train loss")
    ppl_ax.set_ylabel("val perplexity")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("optimizer step")
    lr_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ppl_ax.ticklabel_format(axis="y", useOffset=False)
    perplexities = [value for run in runs for _, value in run.val_perplexity]
    if perplexities and min(perplexities) > 0 and max(perplexities) / min(perplexities) > 10:
        ppl_ax.set_yscale("log")  # from scratch: thousands at first, tens at the end
    for ax, empty in ((loss_ax, "no train loss logged"), (ppl_ax, "no validation"), (lr_ax, "no LR logged")):
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center", color="grey")
    if len(runs) > 1:
        loss_ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return True


class CurvesCallback(L.Callback):
    """At the end of ``fit``, ``curves.png`` and ``run_summary.json`` in the run's folder, on rank zero.

    The series are what the module logged with ``self.log``, read from ``trainer.callback_metrics`` once per
    optimizer step: ``loss_key`` per step, ``val_key`` per validation, ``lr_key`` per step (or, when the
    module logs none, the optimizer's learning rate). Tensors are turned into numbers in batches, not one host
    sync a step. The series and totals are saved in checkpoints, so a resumed fit draws the whole run.
    ``run_summary.json`` holds what the logs lack: wall time, tokens, peak memory, model, data, precision.

    Args:
        show: Display the PNG inline; default: when running in a Jupyter kernel.
        loss_key, val_key, lr_key: The logged names to draw.
    """

    def __init__(
        self,
        show: bool | None = None,
        loss_key: str = "train/loss",
        val_key: str = "val/perplexity",
        lr_key: str = "train/lr",
    ) -> None:
        self.show = show
        self.loss_key, self.val_key, self.lr_key = loss_key, val_key, lr_key
        self.curves = Curves()
        self.written: Path | None = None
        self._warned = False
        self._reset()

    def _reset(self) -> None:
        self.curves = Curves()
        self._pending: list[tuple[int, Any, Any]] = []  # (step, loss, lr), tensors until _materialize
        self._step_done: int | None = None  # an optimizer step whose logged values are not read yet
        self._last_loss: Any = None
        self._last_step = 0
        self._optimizer_lr: float | None = None
        self._earlier_seconds, self._tokens, self._start = 0.0, 0, time.perf_counter()

    @property
    def state_key(self) -> str:
        return f"CurvesCallback[{self.loss_key},{self.val_key}]"

    # ---------------------------------------------------------------------------------- recording
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._reset()  # a checkpoint's state is loaded after this, when fit resumes

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step  # restored by now when fit resumes

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._optimizer_lr = float(optimizer.param_groups[0]["lr"])  # a Python float: no sync

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._read_step(trainer)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if isinstance(batch, dict) and isinstance(batch.get("input_ids"), torch.Tensor):
            self._tokens += real_tokens(batch) * trainer.world_size  # padding not counted
        if trainer.global_step != self._last_step:  # an optimizer step was taken (not an accumulation)
            self._step_done = self._last_step = trainer.global_step
        # Read later (next batch, validation or epoch end): a module may log the step's loss in its own
        # on_train_batch_end, which Lightning calls after the callbacks'.

    def _read_step(self, trainer: L.Trainer) -> None:
        if self._step_done is None:
            return
        step, self._step_done = self._step_done, None
        metrics = trainer.callback_metrics
        loss = metrics.get(self.loss_key)
        if loss is None or _same_tensor(loss, self._last_loss):  # not logged again (a skipped step)
            return
        self._last_loss = loss
        lr = metrics.get(self.lr_key, self._optimizer_lr)
        self._pending.append((step, loss, lr))
        if len(self._pending) >= 256:
            self._materialize()

    def _materialize(self) -> None:
        """The pending tensors as numbers, in one transfer (one host sync per 256 steps at most)."""
        if not self._pending:
            return
        steps = [step for step, _, _ in self._pending]
        losses = _to_floats([loss for _, loss, _ in self._pending])
        lrs = _to_floats([lr for _, _, lr in self._pending])
        self.curves.train_loss += list(zip(steps, losses, strict=True))
        self.curves.lr += [(s, v) for s, v in zip(steps, lrs, strict=True) if v is not None]
        self._pending = []

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read_step(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.val_key)
        if trainer.sanity_checking or value is None or trainer.state.fn != "fit":
            return
        self.curves.val_perplexity.append((trainer.global_step, float(value)))  # once per validation
        self._materialize()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read_step(trainer)

    def state_dict(self) -> dict[str, Any]:
        # A checkpoint written at a step's end (every N steps, or on a signal) comes before that step's values
        # are read: a resumed run's curves lack that one step.
        self._materialize()
        curves = self.curves
        return {
            "train_loss": [list(p) for p in curves.train_loss],
            "val_perplexity": [list(p) for p in curves.val_perplexity],
            "lr": [list(p) for p in curves.lr],
            "seconds": self._earlier_seconds + time.perf_counter() - self._start,
            "tokens": self._tokens,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.curves = Curves(
            train_loss=[(int(s), float(v)) for s, v in state_dict.get("train_loss", [])],
            val_perplexity=[(int(s), float(v)) for s, v in state_dict.get("val_perplexity", [])],
            lr=[(int(s), float(v)) for s, v in state_dict.get("lr", [])],
        )
        self._earlier_seconds = float(state_dict.get("seconds", 0.0))
        self._tokens = int(state_dict.get("tokens", 0))

    # ---------------------------------------------------------------------------------- drawing
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read_step(trainer)
        self._materialize()
        # A collective under DDP (broadcast from rank zero), so every rank asks. A W&B logger without a
        # save_dir has none: the trainer's root folder then.
        log_dir = trainer.log_dir or getattr(trainer, "default_root_dir", None)
        if not trainer.is_global_zero or log_dir is None:
            return
        folder = Path(log_dir)
        summary = self.summary(trainer, pl_module)
        with atomic_path(folder / SUMMARY_FILE) as tmp:
            tmp.write_text(json.dumps(summary, indent=1) + "\n")
        self.curves.label = folder.name
        title = " · ".join(
            [f"{folder.parent.name}/{folder.name}", summary["model"], summary["data"], summary["precision"],
             format_duration(summary["wall_seconds"])]
        )  # fmt: skip
        if not draw_curves([self.curves], folder / CURVES_FILE, title):
            if not self._warned:
                rank_zero_warn(
                    f"CurvesCallback draws curves.png with matplotlib, which is missing: {INSTALL_HINT}"
                )
                self._warned = True
            return
        self.written = folder / CURVES_FILE
        if self.show or (self.show is None and in_notebook()):
            from IPython.display import Image, display

            display(Image(filename=str(self.written)))

    def summary(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """What ``run_summary.json`` holds: the run's totals and what it was."""
        ppl = [value for _, value in self.curves.val_perplexity]
        return {
            "model": describe_model(pl_module),
            "data": describe_data(trainer.datamodule),
            "precision": str(trainer.precision),
            "world_size": trainer.world_size,
            "steps": trainer.global_step,
            "epochs": trainer.current_epoch,
            "tokens": self._tokens,
            "wall_seconds": round(self._earlier_seconds + time.perf_counter() - self._start, 3),
            "peak_rss_bytes": peak_rss_bytes(),
            "peak_device_bytes": peak_device_bytes(pl_module.device),
            "best_val_perplexity": min(ppl) if ppl else None,
            "last_val_perplexity": ppl[-1] if ppl else None,
            "val_perplexity": [list(p) for p in self.curves.val_perplexity],
        }


def _same_tensor(a: Any, b: Any) -> bool:
    """Whether ``a`` is the value ``b`` again: Lightning hands out a new ``detach()`` view of the same
    logged tensor each time, and each ``self.log`` stores a new copy (whose memory cannot be ``b``'s while
    ``b`` is held)."""
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.data_ptr() == b.data_ptr()


def _to_floats(values: list[Any]) -> list[float | None]:
    """Numbers and scalar tensors as floats, the tensors in one stacked copy per device."""
    out: list[float | None] = [None if v is None else v for v in values]
    tensors = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
    if tensors:
        stacked = torch.stack([values[i].detach().reshape(()).to(torch.float64) for i in tensors]).tolist()
        for i, value in zip(tensors, stacked, strict=True):
            out[i] = value
    return [None if v is None else float(v) for v in out]


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (IPython in a terminal cannot show images)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def describe_model(pl_module: L.LightningModule) -> str:
    """``gpt2 · 124.4 M params``: the pretrained name (or model type), the parameter count, those trained."""
    hparams = getattr(pl_module, "hparams", {})
    model = getattr(pl_module, "model", None)
    config = getattr(model, "config", None)
    name = (
        hparams.get("model_name_or_path") or getattr(config, "model_type", None) or type(pl_module).__name__
    )
    params = sum(p.numel() for p in pl_module.parameters())
    trained = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
    if trained == params:
        return f"{name} · {format_count(params)} params"
    return f"{name} · {format_count(params)} params ({format_count(trained)} trained)"  # LoRA


def describe_data(datamodule: Any) -> str:
    """The data's source: a built-in corpus, a hub dataset, the train file, or the data module's class."""
    if datamodule is None:
        return "data"
    hparams = getattr(datamodule, "hparams", {})
    if hparams.get("corpus"):
        return str(hparams["corpus"])
    if hparams.get("dataset_name"):
        config = hparams.get("dataset_config_name")
        return f"{hparams['dataset_name']}/{config}" if config else str(hparams["dataset_name"])
    files = hparams.get("data_files")
    if isinstance(files, dict) and files.get("train"):
        return Path(str(files["train"])).name
    if isinstance(files, str):
        return Path(files).name
    return type(datamodule).__name__


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory (None where ``resource`` is missing, as on Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def peak_device_bytes(device: torch.device) -> int | None:
    """Peak memory allocated by tensors on a CUDA device, else None."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(device))
