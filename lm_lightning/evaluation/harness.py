"""The one way into lm-evaluation-harness: tasks found by name (local ones first), a model object run as HFLM.

The ``evaluate`` command and ``HarnessEvalCallback`` both go through :func:`run_harness`. ``lm_eval`` is
imported inside the functions: it is an optional dependency, and ``import lm_lightning`` must not need it.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from lm_lightning.errors import RunError

LOCAL_TASKS = Path(__file__).parent / "tasks"
INSTALL = 'pip install -e ".[eval]" (in a checkout of lm_lightning), or pip install "lm-eval[hf]>=0.4.13"'
LOCAL_DATA_HINT = (
    "To run a task on local files, copy its YAML into a folder, set `dataset_path: json` (or csv, parquet) "
    "and `dataset_kwargs: {data_files: {test: /path/to/test.jsonl}}`, and give that folder with "
    "--include_path (see 'Benchmark tasks' in the README)."
)
# What the harness logs about what we do on purpose: a model object rather than a hub name (so it does no
# device placement or data parallelism of its own), and a task whose data set a function builds.
_EXPECTED_WARNINGS = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
    "Custom kwargs can be passed to `--metadata`",
)


def require_lm_eval() -> None:
    """A ``RunError`` with the install command when lm-evaluation-harness (with its HF model) is missing."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (needs accelerate: the harness's [hf] extra)
    except ImportError as err:
        raise RunError(
            f"Benchmark tasks run through EleutherAI's lm-evaluation-harness, which is not installed "
            f"({err}). Install it with: {INSTALL}."
        ) from err


def parse_tasks(tasks: str | list[str], setting: str = "--tasks") -> list[str]:
    """Task names from a comma-separated string (as the harness's own ``--tasks``) or a list."""
    names = tasks.split(",") if isinstance(tasks, str) else [str(t) for t in tasks]
    names = [name.strip() for name in names if name.strip()]
    if not names:
        raise RunError(
            f"{setting}={tasks!r} names no task: give harness task names separated by commas, e.g. "
            f"{setting} python_docs_mc,hellaswag (python_docs_mc ships with lm_lightning and runs offline)."
        )
    return names


def local_task_names() -> list[str]:
    """The tasks that ship with lm_lightning (the YAML files in ``lm_lightning/evaluation/tasks``)."""
    return sorted(path.stem for path in LOCAL_TASKS.glob("*.yaml"))


def task_manager(names: list[str], include_path: list[str] | str | None = None) -> Any:
    """A harness ``TaskManager`` that knows every one of ``names``; a ``RunError`` naming any it does not.

    lm_lightning's local tasks and those of ``include_path`` come first. The harness's own index (about 15,000
    tasks, about 10 s to build) is only read when a name is not among them.
    """
    from lm_eval.tasks import TaskManager

    paths = [str(LOCAL_TASKS)]
    for folder in [include_path] if isinstance(include_path, str) else include_path or []:
        if not Path(folder).is_dir():
            raise RunError(
                f"--include_path={folder!r} is not a folder: give folders that hold task YAML files."
            )
        paths.append(str(folder))
    manager = TaskManager(include_path=paths, include_defaults=False)
    if all(_known(manager, name) for name in names):
        return manager
    manager = TaskManager(include_path=paths)
    unknown = [name for name in names if not _known(manager, name)]
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise RunError(
            f"--tasks: {unknown[0]!r} is not a task, group or tag of lm-evaluation-harness, of lm_lightning "
            f"({', '.join(local_task_names())}) or of --include_path.{hint} `lm-eval ls tasks` lists the "
            "harness's; a task of your own is a YAML file in a folder given with --include_path."
        )
    return manager


def _known(manager: Any, name: str) -> bool:
    return name in manager.all_tasks or bool(manager.match_tasks([name])) or Path(name).is_file()


def load_tasks(manager: Any, names: list[str]) -> list[Any]:
    """The harness's task (or group) objects of ``names``, with their data sets loaded: before any model is.

    A task whose data cannot be read fails here with the harness's own error in our one paragraph, saying how
    to run it offline.
    """
    objects: list[Any] = []
    for spec in names:
        exact = spec in manager.all_tasks or Path(spec).is_file()
        expanded = [spec] if exact else manager.match_tasks([spec])
        for name in expanded:
            try:
                with _without_expected_warnings():
                    loaded = manager.load([name])
            except Exception as err:  # a data set on the hub, a missing file, a YAML the harness refuses ...
                raise RunError(_load_error(name, err)) from err
            group = loaded["groups"].get(name)
            objects += [group] if group is not None else list(loaded["tasks"].values())
    return objects


def _load_error(name: str, err: Exception) -> str:
    cause = f"{type(err).__name__}: {err}".strip()
    message = f"--tasks {name}: the harness could not load this task ({cause})."
    if isinstance(err, ConnectionError) or " on the Hub" in str(err):
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        message += (
            " Its data set comes from the Hugging Face hub, which was not reached"
            + (" (HF_HUB_OFFLINE is set)" if offline else "")
            + ". Offline (HF_HUB_OFFLINE=1, which also stops the retries), a hub task runs only once its "
            "data set is in the datasets cache (run it once where the hub is reachable)."
        )
    return f"{message} {LOCAL_DATA_HINT}"


def run_harness(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[Any],
    manager: Any,
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int | str = 8,
    log_samples: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on ``model`` in memory (a Hugging Face causal LM, or a peft model with its
    adapters), through the harness's ``HFLM``; its results dict.

    The model runs where it is, in eval mode; ``autocast_dtype`` runs it under autocast. The tokenizer is
    copied: the harness may set its pad token.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    with _without_expected_warnings():
        lm = HFLM(
            pretrained=model,
            tokenizer=copy.deepcopy(tokenizer),
            batch_size=batch_size,
            mixed_precision_dtype=autocast_dtype,
        )
        return simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=manager,
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=batch_size,  # recorded in the results (the model object already has it)
            log_samples=log_samples,
        )


@contextlib.contextmanager
def _without_expected_warnings() -> Iterator[None]:
    def expected(record: logging.LogRecord) -> bool:
        return not any(text in str(record.msg) for text in _EXPECTED_WARNINGS)

    loggers = [logging.getLogger(name) for name in ("lm_eval.models.huggingface", "lm_eval.api.task")]
    for logger in loggers:
        logger.addFilter(expected)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(expected)


def results_table(results: dict[str, Any]) -> str:
    """The harness's own tables of a results dict: tasks, and groups when there are any."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


def metric_values(results: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """``{prefix}/<task>/<metric>`` (``.../<metric>/<filter>`` for a filter other than ``none``) -> value.

    The harness keys each value ``"<metric>,<filter>"``; standard errors and non-numbers are left out.
    """
    values = {}
    for task, row in results.get("results", {}).items():
        for key, value in row.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or not isinstance(value, int | float):
                continue
            name = metric if filter_name == "none" else f"{metric}/{filter_name}"
            values[f"{prefix}/{task}/{name}"] = float(value)
    return values
