"""Two nodes on one machine, through the CLI and Lightning's own cluster environment (torchrun's variables).

Two torchrun invocations (``--nnodes 2 --node_rank 0|1 --nproc_per_node 1``, loopback, a free port) run
``python -m lm_lightning fit ... --trainer.num_nodes 2 --trainer.devices 1``: one process a node, gloo, batch
2 each, so a global batch of 4. The reference is one process with batch 4. Rank 1 waits inside step 3 until
the test sends its process a SIGTERM: both nodes must checkpoint step 4 and exit non-zero; the checkpoint is
then resumed on one node (one process, batch 4) to step 6. The tests share these runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_elastic import run_group

from lm_lightning.data.sampling import PADDING

# Multi-process: four launches (about a minute on 2 busy cores), still run in CI.
pytestmark = pytest.mark.slow

STEPS, SIGNALLED = 6, 3  # the fits run to step 6; rank 1 is sent SIGTERM inside step 3 (0-based)
TIMEOUT = 300  # every process: a collective that never completes would hang the suite

# Loaded by every fit (the working directory is on its sys.path): per rank, each micro-batch's step and rows,
# the first step's gradient, the validation perplexity, the checkpoints written; and the wait for the signal.
RECORDER = """
import json, os, time
import lightning as L
import torch
from lm_lightning.model.interrupts import pending_signal


class Recorder(L.Callback):
    def __init__(self, name: str = "run", wait_rank: int = -1, wait_step: int = -1):
        self.name, self.wait_rank, self.wait_step = name, wait_rank, wait_step

    def _write(self, trainer, **record):
        with open(f"{self.name}-rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\\n")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._write(trainer, step=trainer.global_step, rows=list(batch["sample_index"]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:  # the step's gradient, all-reduced
            grad = torch.cat([p.grad.flatten() for p in pl_module.parameters() if p.grad is not None])
            torch.save(grad, f"{self.name}-grad-rank{trainer.global_rank}.pt")
        if trainer.global_step == self.wait_step and trainer.global_rank == self.wait_rank:
            with open(f"{self.name}-waiting.tmp", "w") as f:  # the test signals this process now
                f.write(str(os.getpid()))
            os.replace(f"{self.name}-waiting.tmp", f"{self.name}-waiting.pid")
            deadline = time.monotonic() + 120
            while not pending_signal(trainer) and time.monotonic() < deadline:
                time.sleep(0.05)

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            perplexity = float(trainer.callback_metrics["val/perplexity"])
            self._write(trainer, step=trainer.global_step, perplexity=perplexity)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self._write(trainer, saved=trainer.global_step)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(folder: Path, tokenizer: str, texts: list[str]) -> Path:
    (folder / "train.txt").write_text("".join(texts[:14]))  # 29 blocks of 32: 8 steps of 4 an epoch
    (folder / "valid.txt").write_text("".join(texts[500:504]))  # 7 blocks: rank 1 gets one fewer
    (folder / "recorder.py").write_text(textwrap.dedent(RECORDER))
    config = {
        "seed_everything": 3,
        "trainer": {
            "accelerator": "cpu", "strategy": "ddp", "devices": 1, "max_steps": STEPS,
            "val_check_interval": 2, "num_sanity_val_steps": 0, "enable_model_summary": False,
            "enable_progress_bar": False,
            # float32 whatever this CPU has (bf16-mixed is the default on AMX/AVX512-BF16 CPUs): one process
            # and two nodes must agree to 1e-6
            "precision": "32-true",
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": "runs", "name": "nodes"}},
        },
        "model": {
            "model_config": {"n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 32, "resid_pdrop": 0.0,
                             "embd_pdrop": 0.0, "attn_pdrop": 0.0},
            "learning_rate": 1e-3, "lr_scheduler": "constant",
        },
        "data": {
            "tokenizer": tokenizer, "data_files": {"train": "train.txt", "validation": "valid.txt"},
            "block_size": 32, "batch_size": 4, "cache_dir": "cache", "seed": 5,
        },
    }  # fmt: skip
    path = folder / "nodes.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# Set by launchers: never inherited (torchrun sets its own; one process finds a free port).
LAUNCHER = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


def environment(folder: Path) -> dict[str, str]:
    path = os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])
    inherited = {k: v for k, v in os.environ.items() if k not in LAUNCHER}
    # Loopback only: gloo binds to the interface of the host name unless told otherwise.
    return {**inherited, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def cli(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m lm_lightning fit`` on one process in ``folder``."""
    command = [sys.executable, "-m", "lm_lightning", "fit", "--config", "nodes.yaml", *args]
    return run_group(command, TIMEOUT, cwd=folder, env=environment(folder))


def two_nodes(folder: Path, *args: str, signal_rank_1: bool = False) -> list[subprocess.CompletedProcess]:
    """The fit as two torchrun "nodes" on the loopback address; with ``signal_rank_1``, rank 1's process is
    sent SIGTERM once it waits inside step ``SIGNALLED``. Every process is killed if the pair outlives the
    timeout."""
    port = free_port()
    fit = ["-m", "lm_lightning", "fit", "--config", "nodes.yaml", "--trainer.num_nodes", "2", *args]
    nodes = []
    for node_rank in (0, 1):
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
            "--master_addr", "127.0.0.1", "--master_port", str(port), "--nproc_per_node", "1", *fit,
        ]  # fmt: skip
        nodes.append(subprocess.Popen(command, cwd=folder, env=environment(folder), start_new_session=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    deadline = time.monotonic() + TIMEOUT
    try:
        if signal_rank_1:
            pid_file = folder / "nodes-waiting.pid"
            while not pid_file.exists() and time.monotonic() < deadline and nodes[1].poll() is None:
                time.sleep(0.1)
            assert pid_file.exists(), "rank 1 never reached the step to be signalled"
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        outputs = [node.communicate(timeout=max(deadline - time.monotonic(), 1)) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.communicate()
    return [
        subprocess.CompletedProcess(n.args, n.returncode, *out) for n, out in zip(nodes, outputs, strict=True)
    ]


def records(folder: Path, name: str, rank: int) -> list[dict]:
    path = folder / f"{name}-rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def step_rows(folder: Path, name: str, ranks: int) -> dict[int, list[int]]:
    seen: dict[int, list[int]] = {}
    for rank in range(ranks):
        for r in records(folder, name, rank):
            if "rows" in r:
                seen.setdefault(r["step"], []).extend(x for x in r["rows"] if x != PADDING)
    return {step: sorted(rows) for step, rows in seen.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bpe_tokenizer_path, doc_texts) -> Path:
    folder = tmp_path_factory.mktemp("nodes")
    write_config(folder, bpe_tokenizer_path, doc_texts)
    # The reference first: it also writes the data cache, which both nodes then read.
    one = cli(folder, "--trainer.callbacks+=recorder.Recorder", "--trainer.callbacks.name=one")
    assert one.returncode == 0, one.stderr[-4000:]
    recorder = ["--trainer.callbacks+=recorder.Recorder", "--trainer.callbacks.name=nodes",
                "--trainer.callbacks.wait_rank=1", f"--trainer.callbacks.wait_step={SIGNALLED}"]  # fmt: skip
    nodes = two_nodes(folder, *recorder, "--data.batch_size", "2", signal_rank_1=True)
    (folder / "nodes.json").write_text(json.dumps([[n.returncode, n.stdout, n.stderr] for n in nodes]))
    last = folder / "runs" / "nodes" / "version_1" / "checkpoints" / "last.ckpt"
    assert last.is_file(), nodes[0].stderr[-4000:] + nodes[1].stderr[-4000:]
    resumed = cli(folder, "--trainer.callbacks+=recorder.Recorder", "--trainer.callbacks.name=resumed",
                  "--ckpt_path", str(last))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    (folder / "resumed.log").write_text(resumed.stdout + resumed.stderr)
    return folder


def test_two_nodes_validate_and_step_as_one_process(runs):
    # The validation at step 2: 7 blocks, 4 on node 0 and 3 on node 1 (a padding block, never scored).
    one = [r["perplexity"] for r in records(runs, "one", 0) if "perplexity" in r]
    nodes = [[r["perplexity"] for r in records(runs, "nodes", rank) if "perplexity" in r] for rank in (0, 1)]
    assert len(one) == 3 and nodes[0] == nodes[1] and len(nodes[0]) == 1  # steps 2, 4, 6; the nodes stop at 4
    print(f"val/perplexity at step 2: one process {one[0]!r}, two nodes {nodes[0][0]!r}")
    assert nodes[0][0] == pytest.approx(one[0], rel=1e-6)
    # The first step's gradient, all-reduced over the nodes, is the one process's over the same 4 rows.
    reference = torch.load(runs / "one-grad-rank0.pt", weights_only=True)
    for rank in (0, 1):
        grad = torch.load(runs / f"nodes-grad-rank{rank}.pt", weights_only=True)
        relative = ((grad - reference).norm() / reference.norm()).item()
        print(f"step 0 gradient, node {rank} vs one process: relative difference {relative:.2e}")
        assert relative < 1e-6
    assert step_rows(runs, "nodes", 2) == {
        s: r for s, r in step_rows(runs, "one", 1).items() if s <= SIGNALLED
    }


def test_a_sigterm_to_one_node_checkpoints_both_at_the_same_step_and_exits_non_zero(runs):
    nodes = json.loads((runs / "nodes.json").read_text())
    for code, _, stderr in nodes:
        assert code != 0 and "exitcode  : 143" in stderr  # torchrun fails with its worker's 128 + SIGTERM
    saved = [[r["saved"] for r in records(runs, "nodes", rank) if "saved" in r] for rank in (0, 1)]
    assert saved[0][-1] == saved[1][-1] == SIGNALLED + 1  # both took part in the checkpoint of step 4
    trained = [max(r["step"] for r in records(runs, "nodes", rank) if "rows" in r) for rank in (0, 1)]
    assert trained == [SIGNALLED, SIGNALLED]  # and neither trained past it
    assert (
        f"Saved runs/nodes/version_1/checkpoints/last.ckpt at step {SIGNALLED + 1} (epoch 0)" in nodes[0][2]
    )


def test_the_resume_on_one_node_goes_on_exactly(runs):
    one, resumed = step_rows(runs, "one", 1), step_rows(runs, "resumed", 1)
    assert resumed == {s: one[s] for s in range(SIGNALLED + 1, STEPS)}
    log = (runs / "resumed.log").read_text()
    assert "written by 2 processes x batch 2 x accumulate 1, resumed on 1 process x batch 4" in log
    assert "rank 0 restores its own; the saved states of rank 1 are not used" in log
    a = torch.load(runs / "runs" / "nodes" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(runs / "runs" / "nodes" / "version_2" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == STEPS
    diff = max((a["state_dict"][k] - b["state_dict"][k]).abs().max().item() for k in a["state_dict"])
    print(f"resumed on one node vs one process throughout: max weight difference {diff:.2e}")
    assert diff < 1e-5
