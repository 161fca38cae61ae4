"""FSDP2 (fully_shard through ModelParallelStrategy) on CPU, 2 processes over gloo: the shipped recipe.

One straight fit to step 2N (sharded checkpoint folders at N and 2N); one fit stopped by max_steps=N (its
last.ckpt written at the end of the fit, mid-epoch) and resumed from it to 2N; then, in this one process: the
resumed weights equal the straight ones, the fit's export equals the checkpoint folder's one-process export,
and the sharded validation perplexity equals the exported model's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import quiet_trainer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from lm_lightning import CausalLMDataModule, CausalLMModule, load_tokenizer
from lm_lightning.data.sampling import PADDING, EvenUnrepeatedSampler
from lm_lightning.model.checkpointing import find_last_checkpoint, load_checkpoint
from lm_lightning.model.module import export_checkpoint
from lm_lightning.model.sharded import is_sharded_checkpoint, swap_in

RECIPE = Path(__file__).parents[1] / "configs" / "gpt2-xl-fsdp.yaml"
N = 3  # steps before the cut; the fits run to 2N

# Loaded by the fits (the working directory is on sys.path): per optimizer step the total gradient norm
# before and after clipping (full tensors of the shards), and each validation's perplexity, from rank 0.
RECORDER = """
import json
import lightning as L
import torch


def _norm(params):
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


class Recorder(L.Callback):
    def __init__(self, path: str = "record.json"):
        self.path, self.record = path, {"before": [], "after": [], "perplexity": [], "batches": [],
                                   "grad_type": None}

    def on_train_start(self, trainer, pl_module):
        def after(optimizer, args, kwargs):
            self.record["after"].append(_norm(p for g in optimizer.param_groups for p in g["params"]))

        trainer.optimizers[0].register_step_post_hook(after)  # the gradients the step used: clipped

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # Lightning clips after this hook
        self.record["before"].append(_norm(pl_module.parameters()))
        self.record["grad_type"] = type(next(pl_module.parameters()).grad).__name__

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.record["batches"].append(int(batch["input_ids"].sum()))

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.record["perplexity"].append(float(trainer.callback_metrics["val/perplexity"]))

    def on_fit_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            with open(self.path, "w") as f:
                json.dump(self.record, f)
"""


def _fit(tmp_path: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "lm_lightning", "fit", "--config", str(RECIPE), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,  # a collective that never completes would hang the suite: fail instead
    )
    assert out.returncode == 0, f"{name}: {out.stderr[-4000:]}"
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.mark.slow
def test_fsdp2_recipe_clips_resumes_exactly_and_exports_on_cpu(
    tmp_path, bpe_tokenizer_path, doc_texts, monkeypatch
):
    # A tiny pretrained GPT-2 (dropout on) saved with its tokenizer: the recipe's pretrained load path.
    tokenizer = load_tokenizer(bpe_tokenizer_path)
    pretrained = tmp_path / "tiny-gpt2"
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=eos,
        eos_token_id=eos,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(pretrained)
    tokenizer.save_pretrained(pretrained)
    (tmp_path / "train.txt").write_text("".join(doc_texts[:12]))  # ~30 blocks: crosses an epoch by 2N
    (tmp_path / "valid.txt").write_text("".join(doc_texts[500:503]))  # 5 blocks: padding on both ranks
    (tmp_path / "recorder.py").write_text(textwrap.dedent(RECORDER))
    files = json.dumps({"train": "train.txt", "validation": "valid.txt"})
    cpu = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true"]
    small = [
        f"--model.model_name_or_path={pretrained}", f"--data.tokenizer={pretrained}",
        "--data.dataset_name=null", "--data.dataset_config_name=null", f"--data.data_files={files}",
        "--data.block_size=32", "--data.batch_size=2", "--data.eval_batch_size=2", "--data.num_workers=0",
        "--data.cache_dir=cache", "--model.learning_rate=3e-3", "--model.lr_scheduler=constant",
        "--data.eos_between_texts=true", "--data.document_masking=true",
        "--trainer.enable_progress_bar=false", "--trainer.strategy.init_args.timeout_minutes=2",
        f"--trainer.max_steps={2 * N}", f"--trainer.val_check_interval={2 * N}",
        f"--last_checkpoint.every_n_train_steps={N}", "--last_checkpoint.save_top_k=-1",
        "--last_checkpoint.filename={step}", "--trainer.callbacks+=recorder.Recorder",
    ]  # fmt: skip
    _fit(tmp_path, "straight", *cpu, *small, "--model.export_dir=hf_straight")
    ckpts = tmp_path / "runs" / "gpt2-xl-fsdp" / "version_0" / "checkpoints"
    cut = ckpts / f"step={N}.ckpt"
    assert is_sharded_checkpoint(cut) and sorted(p.name for p in cut.iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "meta.pt",
    ]
    # --ckpt_path last finds the folder; its meta.pt loads with weights_only=True and records step 2N.
    last = find_last_checkpoint(tmp_path / "runs" / "gpt2-xl-fsdp")
    assert last == ckpts / "last.ckpt" and load_checkpoint(last)["global_step"] == 2 * N
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]  # no partial folder left behind
    record = json.loads((tmp_path / "record.json").read_text())

    # Clipping at the recipe's 1.0, on sharded (DTensor) gradients.
    assert record["grad_type"] == "DTensor" and len(record["before"]) == 2 * N
    assert max(record["before"]) > 1.0
    for before, after in zip(record["before"], record["after"], strict=True):
        assert after == pytest.approx(min(before, 1.0), rel=1e-5)

    # Stopped by max_steps=N, with no periodic checkpoint there: Lightning writes last.ckpt at the end of the
    # fit, after marking the epoch done. Resumed from it (a fresh process pair) to 2N: the rest of the epoch
    # is trained, and the weights are the straight run's.
    stop = [f"--trainer.max_steps={N}", "--last_checkpoint.every_n_train_steps=1000"]
    _fit(tmp_path, "stopped", *cpu, *small, *stop)
    stopped = tmp_path / "runs" / "gpt2-xl-fsdp" / "version_1" / "checkpoints" / "last.ckpt"
    assert is_sharded_checkpoint(stopped) and load_checkpoint(stopped)["global_step"] == N
    (tmp_path / "record.json").unlink()
    resumed = _fit(
        tmp_path, "resumed", *cpu, *small, f"--ckpt_path={stopped}", "--model.export_dir=hf_resumed"
    )
    assert f"epoch 0, step {N}" in resumed.stdout
    again = json.loads((tmp_path / "record.json").read_text())
    assert again["batches"] == record["batches"][N:]  # the epoch goes on where it stopped
    a, b = _weights(tmp_path / "hf_straight"), _weights(tmp_path / "hf_resumed")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert a["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # whole tensors, not shards

    # The checkpoint folder of step 2N exports on one process, equal to the fit's own export.
    export_checkpoint(ckpt_path=str(last), output_dir=str(tmp_path / "hf_folder"))
    c = _weights(tmp_path / "hf_folder")
    assert all(torch.equal(a[k], c[k]) for k in a)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_straight").eval()
    x = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    from_folder = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_folder").eval()
    with torch.no_grad():
        assert torch.equal(exported(x).logits, from_folder(x).logits)

    # The sharded validation at step 2N equals one process's: 5 document-masked blocks in batches of 2, so
    # rank 0 has blocks 0, 2, 4 and a padding block, rank 1 blocks 1, 3 and two (labels -100: never scored).
    sharded_ppl = again["perplexity"][-1]
    assert sharded_ppl == pytest.approx(record["perplexity"][-1], rel=1e-6)
    data = CausalLMDataModule(
        tokenizer=str(pretrained), data_files={"train": "train.txt", "validation": "valid.txt"},
        block_size=32, eval_batch_size=2, cache_dir=str(tmp_path / "cache"), eos_between_texts=True,
        document_masking=True,
    )  # fmt: skip
    module = CausalLMModule(model_name_or_path=str(tmp_path / "hf_straight"))
    monkeypatch.chdir(tmp_path)
    metrics = quiet_trainer(tmp_path).validate(module, data, verbose=False)[0]
    print(f"val/perplexity: sharded {sharded_ppl!r}, one process {metrics['val/perplexity']!r}")
    assert len(data.datasets["validation"]) == 5
    assert metrics["val/perplexity"] == pytest.approx(sharded_ppl, rel=1e-6)


def test_even_sampler_gives_each_block_once_and_every_rank_the_same_batches():
    ranks = [EvenUnrepeatedSampler(range(5), 2, r, batch_size=2) for r in range(2)]
    assert [list(s) for s in ranks] == [[0, 2, 4, PADDING], [1, 3, PADDING, PADDING]]
    seen = sorted(i for s in ranks for i in s if i != PADDING)
    assert seen == list(range(5))


def test_swap_in_replaces_a_folder_whole(tmp_path):
    old, new = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.partial"
    old.mkdir()
    (old / "meta.pt").write_text("old")
    new.mkdir()
    (new / "meta.pt").write_text("new")
    swap_in(new, old)
    assert (old / "meta.pt").read_text() == "new" and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    # A crash before the swap leaves a complete .partial beside the previous folder: that one is still last.
    for folder in (old, new):
        folder.mkdir(exist_ok=True)
        (folder / ".metadata").write_text("")
        torch.save({"global_step": 1 if folder == old else 2, "state_dict": {}}, folder / "meta.pt")
    assert find_last_checkpoint(tmp_path) == old and load_checkpoint(old)["global_step"] == 1
