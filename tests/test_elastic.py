"""A checkpoint resumed on another number of processes goes on from the next sample of the same global order.

One set of fits shared by the tests (``tests/elastic_matrix.py``): a global batch of 4 as 1 process x batch 4
or 2 processes x batch 2 (gloo), DDP and FSDP2, dropout off, constant LR; straight to step 10 (in epoch 1),
and cut at step 5 (mid epoch 0) then resumed on the other number of processes. Which rows each step trained
is read from the batches (``sample_index``), on every process.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from elastic_matrix import CUT, END, fit, write_text

from lm_lightning.data.global_batches import GlobalBatchSampler
from lm_lightning.data.sampling import PADDING
from lm_lightning.model.elastic import fresh_seed, rng_report

HERE = Path(__file__).parent
ROWS = 29  # training blocks of write_text's text
# The shared fits: a 2-process launch and 6 fits in this process (about 40 s on 2 busy cores); CI runs them.
uses_the_fits = pytest.mark.slow


class Messages:
    """What Lightning's ``rank_zero_info`` logs and the warnings raised, while in the ``with`` block."""

    def __enter__(self) -> list[str]:
        self.lines: list[str] = []
        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.lines.append(record.getMessage())
        self.logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        self.logger.addHandler(self.handler)
        self.warnings = warnings.catch_warnings(record=True)
        self.caught = self.warnings.__enter__()
        warnings.simplefilter("always")
        return self.lines

    def __exit__(self, *exc) -> None:
        self.warnings.__exit__(*exc)
        self.lines.extend(str(w.message) for w in self.caught)
        self.logger.removeHandler(self.handler)


def run_group(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``command`` in its own process group, killed whole (every child too) when it outlives ``timeout``."""
    process = subprocess.Popen(command, start_new_session=True, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, **kwargs)  # fmt: skip
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise AssertionError(f"{command[:6]} ran past {timeout} s and was killed: {err[-4000:]}") from None
    return subprocess.CompletedProcess(command, process.returncode, out, err)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bpe_tokenizer_path) -> dict:
    """Every fit of the elastic tests, each rank's results of the 2-process ones (``name`` and ``name/1``)."""
    out = tmp_path_factory.mktemp("elastic")
    folder = write_text(out / "data")
    tok = bpe_tokenizer_path
    runs = {
        "one-straight": fit(folder, tok, 1, "one-straight", END),
        "one-cut": fit(folder, tok, 1, "one-cut", CUT),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = run_group([*command, str(HERE / "elastic_matrix.py"), str(out), tok], timeout=600,
                    env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert two.returncode == 0, two.stderr[-6000:]
    for rank in range(2):
        for name, result in torch.load(out / f"elastic-rank{rank}.pt", weights_only=True).items():
            runs[name if rank == 0 else f"{name}/1"] = result
    with Messages() as runs["two-to-one messages"]:
        runs["two-to-one"] = fit(
            folder, tok, 1, "two-to-one", END, ckpt_path=str(folder / "two-cut" / "last.ckpt")
        )
    # The global batch changes: 1 process x batch 2 x accumulate 3 (6 rows a step) from the cut at sample 20.
    with Messages() as runs["six messages"]:
        one_cut = str(folder / "one-cut" / "last.ckpt")
        runs["six"] = fit(folder, tok, 1, "six", 9, ckpt_path=one_cut, batch_size=2, accumulate=3)
    fsdp_cut = str(folder / "fsdp-cut" / "last.ckpt")
    environ = dict(os.environ)
    try:
        runs["fsdp-to-one"] = fit(folder, tok, 1, "fsdp-to-one", END, ckpt_path=fsdp_cut, fsdp=True)
    finally:
        if torch.distributed.is_initialized():  # the 1-process group of the sharded fit
            torch.distributed.destroy_process_group()
        # Lightning set MASTER_PORT to the port of that group's store, which stays bound in this process:
        # a later test's processes would inherit it and fail with EADDRINUSE.
        os.environ.clear()
        os.environ.update(environ)
    return runs


def steps(runs: dict, name: str) -> dict[int, list[int]]:
    """Each optimizer step's rows (all processes together), as the batches of fit ``name`` held them."""
    seen: dict[int, list[int]] = {}
    for part in [name, f"{name}/1"]:
        for step, rows in runs.get(part, {}).get("samples", []):
            seen.setdefault(step, []).extend(r for r in rows if r != PADDING)
    return {step: sorted(rows) for step, rows in seen.items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def order(epoch: int) -> list[int]:
    return GlobalBatchSampler(np.ones(ROWS), 1, seed=5).order(epoch).tolist()


@uses_the_fits
def test_the_straight_fits_take_the_global_order_on_any_number_of_processes(runs):
    one, two = steps(runs, "one-straight"), steps(runs, "straight")
    assert one == two and sorted(one) == list(range(END))
    expected = [order(0)[4 * s : 4 * s + 4] for s in range(8)] + [order(1)[0:4], order(1)[4:8]]
    assert [one[s] for s in range(END)] == [sorted(rows) for rows in expected]  # the last of epoch 0: 1 row
    diff = max_diff(runs["one-straight"]["weights"], runs["straight"]["weights"])
    print(f"1 vs 2 processes, straight: max weight difference {diff:.2e}")


@uses_the_fits
@pytest.mark.parametrize(
    "cut, resumed, straight",
    [("cut", "two-to-one", "straight"), ("one-cut", "from-one", "one-straight"),
     ("fsdp-cut", "fsdp-to-one", "fsdp-straight")],
    ids=["ddp-2-to-1", "ddp-1-to-2", "fsdp2-2-to-1"],
)  # fmt: skip
def test_a_resume_on_another_number_of_processes_goes_on_exactly(runs, cut, resumed, straight):
    whole = steps(runs, straight)
    rows = [steps(runs, resumed).get(s) for s in range(CUT, END)]
    print(f"{resumed}: rows of steps {CUT}-{END - 1}: {rows}")
    assert steps(runs, cut) == {s: whole[s] for s in range(CUT)}
    assert steps(runs, resumed) == {s: whole[s] for s in range(CUT, END)}  # nothing repeated or skipped
    diff = max_diff(runs[resumed]["weights"], runs[straight]["weights"])
    print(f"{resumed}: max weight difference to {straight} {diff:.2e}")
    assert diff < 1e-5
    # Lightning's counters: the same step, epoch and micro-batch counts as the straight fit's.
    for key in ("step", "epoch", "batches"):
        assert runs[resumed][key] == runs[straight][key], key
    assert (runs[resumed]["step"], runs[resumed]["batches"]) == (END, (2, 10))  # 2 micro-batches into epoch 1


@uses_the_fits
def test_the_resume_says_where_the_data_goes_on_and_what_the_random_states_do(runs):
    text = "\n".join(runs["two-to-one messages"])
    assert (
        "Resuming the training data at sample 20 of 29 of epoch 0's order (seed 5), the next one after "
        "those the checkpoint's steps trained; written by 2 processes x batch 2 x accumulate 1, resumed on 1 "
        "process x batch 4 x accumulate 1. The same global batch: the same samples in the same steps." in text
    )
    assert (
        "Random states: the checkpoint holds the states of 2 processes; rank 0 restores its own; the saved "
        "states of rank 1 are not used. Dropout is off in this model: the random states do not change the "
        "training." in text
    )
    assert "global batch changes" not in text
    grow = rng_report(2, 4, 0.1)
    assert "ranks 0-1 restore their own; ranks 2-3 had none and draw new ones" in grow
    assert "Dropout is on (largest p = 0.1): a run resumed on 4 process(es) differs" in grow
    assert "rank 1 had none and draws a new one (seeded from the run's seed, the step" in rng_report(1, 2, 0)
    assert rng_report(2, 2, 0.1) is None
    seeds = {fresh_seed(rank, step) for rank in (2, 3) for step in (5, 6)}
    assert len(seeds) == 4 and fresh_seed(2, 5) == fresh_seed(2, 5)  # new, and the same on a rerun


@uses_the_fits
def test_a_change_of_the_global_batch_keeps_the_sample_position_and_the_steps_follow(runs):
    # Cut at step 5 of 4 rows (sample 20), resumed with steps of 6 rows to step 9: the first step takes the
    # 4 rows up to sample 24, the next the 5 left in epoch 0 (3 micro-batches, one padded), then epoch 1's.
    seen = steps(runs, "six")
    expected = [order(0)[20:24], order(0)[24:29], order(1)[0:6], order(1)[6:12]]
    assert [seen[s] for s in range(CUT, 9)] == [sorted(rows) for rows in expected]
    micro = [step for step, _ in runs["six"]["samples"]]
    assert micro == [5, 5, 6, 6, 6, 7, 7, 7, 8, 8, 8]  # Lightning steps where the loader's steps end
    assert (runs["six"]["step"], runs["six"]["batches"]) == (9, (6, 21))  # 5 + 2 x 3 in epoch 0, 2 x 3 in 1
    assert runs["six"]["epoch"] == runs["one-straight"]["epoch"]  # both stopped by max_steps in epoch 1
    text = "\n".join(runs["six messages"])
    assert (
        "The global batch changes from 4 (1 process x batch 4 x accumulate 1) to 6 (1 process x batch 2 x "
        "accumulate 3). The resume keeps the position in samples (sample 20 of epoch 0) and the 5 optimizer "
        "steps made (global_step, the learning-rate schedule's position); the step count follows: each step "
        "from here takes 6 samples, so epoch 0 has 2 steps left, and a whole epoch is 5 steps instead of 8. "
        "--trainer.max_steps counts optimizer steps, of either size. The first step from here takes the 4 "
        "samples up to sample 24, where the steps of 6 start in this epoch's order." in text
    )


@pytest.mark.parametrize("before", [(2, 1, 2), (4, 1, 1), (1, 2, 3), (3, 2, 1)])
@pytest.mark.parametrize("after", [(4, 1, 1), (2, 1, 2), (2, 3, 1), (1, 2, 4), (5, 1, 1)])
def test_any_split_goes_on_from_the_next_sample_with_lightnings_count_aligned(before, after):
    # (batch_size, accumulate, world_size): 3 steps at the first split, the rest of the epoch at the second.
    units = np.arange(1, 51)
    saved = GlobalBatchSampler(units, *before, 0, seed=3)
    drawn = iter(saved)
    for _ in range(3 * before[1]):  # 3 steps of micro-batches
        next(drawn)
    state = saved.state_dict()
    ranks = [GlobalBatchSampler(units, *after, r, seed=3) for r in range(after[2])]
    for sampler in ranks:
        sampler.load_state_dict(state)
    yielded = [list(sampler) for sampler in ranks]
    assert len({len(y) for y in yielded}) == 1  # every process the same number of micro-batches
    rows = [row for y in yielded for mb in y for row in mb.rows if row != PADDING]
    assert sorted(rows) == sorted(saved.order(0)[state["consumed"] :].tolist())  # each row left, once
    done = ranks[0].resumed.batches_done
    assert done + len(yielded[0]) == len(ranks[0])  # the epoch ends where Lightning's count does
    first = yielded[0][0].step_micro_batches
    if first < len(yielded[0]):  # Lightning steps after the first step's last micro-batch
        assert (done + first) % after[1] == 0
