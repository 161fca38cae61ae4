"""``python -m lm_lightning evaluate``: benchmark tasks on a checkpoint (``last``, ``best``, a file) or a
model folder, with the results JSON written into the run the checkpoint belongs to."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from lm_lightning.data.tokenizer import load_tokenizer
from lm_lightning.errors import RunError, is_user_error, report_and_exit
from lm_lightning.evaluation.harness import (
    load_tasks,
    parse_tasks,
    require_lm_eval,
    results_table,
    run_harness,
    task_manager,
)
from lm_lightning.io import atomic_path
from lm_lightning.model.checkpointing import check_checkpoint, resolve_best, resolve_last
from lm_lightning.model.module import CausalLMModule
from lm_lightning.model.sharded import consolidated

DEFAULT_RUN_DIR = "runs/lm_lightning"  # fit's default logger folder (save_dir/name)
BEST_MONITOR = "val/perplexity"  # what fit's checkpoint callback ranks by


@dataclasses.dataclass
class EvaluatedModel:
    """A model given by name rather than by checkpoint.

    Args:
        model_name_or_path: A Hugging Face folder (an export of ours, for one) or hub name, evaluated instead
            of a checkpoint.
        tokenizer: Tokenizer folder or hub name; default: the checkpoint's own, or the model folder's.
    """

    model_name_or_path: str | None = None
    tokenizer: str | None = None


def evaluate_checkpoint(
    *,
    tasks: str,
    ckpt_path: str | None = None,
    model: EvaluatedModel | None = None,
    run_dir: str = DEFAULT_RUN_DIR,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int | Literal["auto"] = 8,
    include_path: list[str] | str | None = None,
    output_path: str | None = None,
    log_samples: bool = False,
    device: str | None = None,
) -> Path:
    """Run lm-evaluation-harness tasks on a checkpoint or a model folder: print the table, write the JSON.

    Args:
        tasks: Harness task names, separated by commas (``python_docs_mc`` ships with lm_lightning and runs
            offline; ``hellaswag,arc_easy`` need their data sets from the hub or its cache).
        ckpt_path: ``last`` (the newest ``last.ckpt`` under ``run_dir``), ``best`` (the checkpoint of best
            ``val/perplexity`` that it records), or a checkpoint written by ``fit``. A LoRA checkpoint is
            evaluated with its adapters on its base model.
        model: Or a model folder or hub name: ``--model.model_name_or_path DIR``.
        run_dir: Where ``last`` and ``best`` look: a run folder (the logger's ``save_dir/name``, e.g.
            ``runs/quickstart``) or a checkpoint folder.
        num_fewshot: Examples in each prompt (default: the task's own, else 0).
        limit: Documents per task (a fraction of them when below 1); for quick checks, not for reporting.
        batch_size: Requests per forward pass, or ``auto`` (the largest that fits).
        include_path: A folder of task YAML files of your own (or a list of folders).
        output_path: The results file (``.json``) or the folder for it; default: ``evaluate/`` in the run the
            checkpoint belongs to (``runs/NAME/version_N/evaluate/``), else ``runs/evaluate/<model name>/``.
        log_samples: Also write each document's prompts and the model's answers (the harness's ``samples``).
        device: Where the model runs; default ``cuda`` when available, else ``cpu``.
    """
    require_lm_eval()
    names = parse_tasks(tasks)
    _check_numbers(num_fewshot, limit, batch_size)
    given = model or EvaluatedModel()
    path = _resolve_checkpoint(ckpt_path, given.model_name_or_path, run_dir)
    out = _results_path(output_path, path, given.model_name_or_path)
    manager = task_manager(names, include_path)
    task_objects = load_tasks(manager, names)  # data sets read (or refused) before any weights are loaded
    hf_model, tokenizer = _load_model(path, given)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = run_harness(
        hf_model.to(device),
        tokenizer,
        task_objects,
        manager,
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=batch_size,
        log_samples=log_samples,
    )
    results["lm_lightning"] = {
        "ckpt_path": None if path is None else str(path),
        "model_name_or_path": given.model_name_or_path,
        "tasks": names,
    }
    from lm_eval.utils import handle_non_serializable

    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    print(results_table(results))
    return out


def _check_numbers(num_fewshot: int | None, limit: int | float | None, batch_size: int | str) -> None:
    if num_fewshot is not None and num_fewshot < 0:
        raise RunError(f"--num_fewshot={num_fewshot} is invalid: give 0 or more examples per prompt.")
    if limit is not None and limit <= 0:
        raise RunError(
            f"--limit={limit} is invalid: give a number of documents (>= 1) or a fraction in (0, 1)."
        )
    if batch_size != "auto" and int(batch_size) < 1:
        raise RunError(f"--batch_size={batch_size} is invalid: give an integer >= 1, or auto.")


def _resolve_checkpoint(ckpt_path: str | None, model_name_or_path: str | None, run_dir: str) -> Path | None:
    """The checkpoint file to evaluate (``None`` for a model folder), checked to be one of ours."""
    if ckpt_path is None and not model_name_or_path:
        raise RunError(
            "evaluate needs a model: --ckpt_path last (the newest checkpoint under --run_dir, default "
            f"{DEFAULT_RUN_DIR}), --ckpt_path best, a checkpoint file, or --model.model_name_or_path DIR."
        )
    if ckpt_path is not None and model_name_or_path:
        raise RunError(
            f"--ckpt_path={ckpt_path!r} and --model.model_name_or_path={model_name_or_path!r} are two "
            "models: give one (a LoRA checkpoint finds its base model itself)."
        )
    if ckpt_path is None:
        return None
    if ckpt_path in ("last", "best"):
        last = resolve_last([Path(run_dir)], "evaluate", f"--ckpt_path {ckpt_path} (--run_dir={run_dir!r})")
        ckpt_path = str(last if ckpt_path == "last" else resolve_best(last, BEST_MONITOR))
    check_checkpoint(ckpt_path)
    return Path(ckpt_path)


def _results_path(output_path: str | None, ckpt: Path | None, model_name_or_path: str | None) -> Path:
    """A new results file: never one that exists (nothing of the user's is replaced)."""
    if output_path is not None and output_path.endswith(".json"):
        path = Path(output_path)
        if path.exists():
            raise RunError(f"--output_path={output_path!r} exists: give a new file, or a folder.")
        return path
    if output_path is not None:
        folder = Path(output_path)
    elif ckpt is not None and ckpt.parent.name == "checkpoints":
        folder = ckpt.parent.parent / "evaluate"  # the run's version_N folder
    else:
        name = ckpt.stem if ckpt is not None else Path(str(model_name_or_path)).name
        folder = Path("runs") / "evaluate" / name
    if folder.exists() and not folder.is_dir():
        raise RunError(f"--output_path={str(folder)!r} is a file: give a folder, or a new .json file.")
    stamp = datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    path, n = folder / f"results_{stamp}.json", 1
    while path.exists():  # two evaluations within a second
        path, n = folder / f"results_{stamp}-{n}.json", n + 1
    return path


def _load_model(ckpt: Path | None, given: EvaluatedModel) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The model in eval mode (a peft model with its adapters for a LoRA checkpoint) and its tokenizer."""
    if ckpt is not None:
        # Not compiled: the harness's batches change shape from call to call.
        with consolidated(ckpt) as path:
            module = CausalLMModule.load_from_checkpoint(
                path, map_location="cpu", weights_only=True, compile=False
            )
    else:
        module = CausalLMModule(model_name_or_path=given.model_name_or_path, tokenizer=given.tokenizer)
        module.configure_model()
    hparams: dict[str, Any] = dict(module.hparams)
    # The one given, else the checkpoint's own (portable checkpoints), else the one its settings name.
    name = given.tokenizer
    if name is None and module.tokenizer is None:
        name = hparams.get("tokenizer") or hparams.get("model_name_or_path")
    tokenizer = load_tokenizer(name) if name else module.tokenizer
    if tokenizer is None:
        raise RunError(
            f"--ckpt_path={str(ckpt)!r} holds no tokenizer and names none: give --model.tokenizer DIR."
        )
    return module.model.eval(), tokenizer


def evaluate_main(args: list[str], prog: str = "python -m lm_lightning evaluate") -> None:
    """``evaluate``: :func:`evaluate_checkpoint` from the command line; settings errors exit with code 2."""
    from jsonargparse import ArgumentParser, auto_cli

    try:
        out = auto_cli(evaluate_checkpoint, args=args, parser_class=ArgumentParser, prog=prog)
    except Exception as err:
        if is_user_error(err):
            report_and_exit(err, 2)
        raise
    print(f"Wrote the results to {out}")
