"""Shared offline fixtures: a locally trained tokenizer, tiny GPT-2 models, and the shared data folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel

from lm_lightning.data.corpus import python_docs_texts, shared_data_dir
from lm_lightning.data.tokenizer import load_tokenizer, train_bpe_tokenizer

SHARED_DATA = shared_data_dir()
WIKITEXT = SHARED_DATA / "wikitext-2-v1"
GPT2_TOKENIZER = SHARED_DATA / "gpt2-tokenizer"


def quiet_trainer(tmp_path, **kwargs) -> L.Trainer:
    """A one-process CPU Trainer with no logger, checkpoints, progress bar or summary; ``kwargs`` override."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    return L.Trainer(**{**defaults, **kwargs})


class GradNorms(L.Callback):
    """The total gradient norm of each optimizer step, before and after Lightning's gradient clipping."""

    def __init__(self) -> None:
        self.before: list[float] = []
        self.after: list[float] = []

    @staticmethod
    def _norm(params) -> float:
        grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
        return torch.stack(grads).norm().item()

    def on_train_start(self, trainer, pl_module):
        def record(optimizer, args, kwargs):
            self.after.append(self._norm(p for g in optimizer.param_groups for p in g["params"]))

        trainer.optimizers[0].register_step_post_hook(record)  # the gradients the step used

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # Lightning clips after this hook
        self.before.append(self._norm(pl_module.parameters()))


def write_tiny_config(folder: Path, tokenizer_path: str, texts: list[str], **trainer: object) -> Path:
    """``folder/tiny.yaml``: a 1-layer GPT-2 from scratch on ``train.txt``/``valid.txt`` (from ``texts``).

    It logs to ``runs/tiny`` with TensorBoard; ``trainer`` settings override the defaults. Paths are relative
    to ``folder``, the working directory of the commands that use it.
    """
    (folder / "train.txt").write_text("".join(texts[:60]))
    (folder / "valid.txt").write_text("".join(texts[500:520]))
    config = {
        "seed_everything": 1,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 2,
            "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": "tiny"},
            },
            **trainer,
        },
        "model": {"model_config": {"n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 64}},
        "data": {
            "tokenizer": tokenizer_path,
            "data_files": {"train": "train.txt", "validation": "valid.txt"},
            "block_size": 32,
            "batch_size": 4,
            "cache_dir": "cache",
        },
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(monkeypatch, *args: str) -> int:
    """Exit code of the CLI's entry point (what ``python -m lm_lightning`` runs) on ``args``, in-process."""
    from lm_lightning.cli import main

    monkeypatch.setattr(sys, "argv", ["lm_lightning", *args])
    try:
        main()
    except SystemExit as exit_info:
        return int(exit_info.code or 0)
    return 0


needs_shared_data = pytest.mark.skipif(
    not (WIKITEXT / "validation.parquet").exists() or not (GPT2_TOKENIZER / "tokenizer.json").exists(),
    reason=f"needs WikiText-2 and the GPT-2 tokenizer in {SHARED_DATA} (the ../shared/data folder beside "
    "the checkout); set LM_LIGHTNING_SHARED_DATA to point elsewhere",
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, which are many times slower on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def bpe_tokenizer_path(tmp_path_factory) -> str:
    """A 512-token byte-level BPE tokenizer trained on the Python docs, saved in a folder."""
    path = tmp_path_factory.mktemp("tok") / "bpe512"
    train_bpe_tokenizer(python_docs_texts(), 512, path)
    return str(path)


@pytest.fixture
def bpe_tokenizer(bpe_tokenizer_path):
    """A fresh copy of the locally trained tokenizer (tests may change its padding side)."""
    return load_tokenizer(bpe_tokenizer_path)


@pytest.fixture
def tiny_gpt2(bpe_tokenizer) -> GPT2LMHeadModel:
    """A randomly initialised 2-layer, 64-wide GPT-2 for the BPE tokenizer, in eval mode."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(bpe_tokenizer),
        n_positions=128,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=bpe_tokenizer.eos_token_id,
        eos_token_id=bpe_tokenizer.eos_token_id,
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session")
def doc_texts() -> list[str]:
    """Paragraphs of the Python docs, the offline test corpus."""
    return python_docs_texts()


@pytest.fixture(scope="session")
def two_process_steps(tmp_path_factory, bpe_tokenizer_path) -> list[dict]:
    """``tests/steps_matrix.py`` run once on 2 processes (gloo, torchrun): each rank's results.

    One launch for every 2-process case of the step tests (gradients, the resume chain, one sync a step).
    """
    out = tmp_path_factory.mktemp("two-process-steps")
    script = Path(__file__).parent / "steps_matrix.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [*command, str(script), str(out), bpe_tokenizer_path],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-6000:]
    return [torch.load(out / f"ddp-rank{rank}.pt", weights_only=True) for rank in range(2)]


@pytest.fixture(autouse=True)
def float32_default_precision(monkeypatch):
    """In-process runs default to 32-true whatever this CPU has, so figures do not depend on the machine
    (``tests/test_precision.py`` mocks the CPU's capabilities to test the resolution itself)."""
    from lm_lightning import precision

    monkeypatch.setattr(precision, "cpu_bf16_feature", lambda capabilities=None: None)
