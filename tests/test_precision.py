"""Precisions on CPU (what a GPU runs): optimizer and clipping, exact float64 perplexity, resume and export;
compile; open-ended runs; the head's gradient under bf16 weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, GPT2Config

from lm_lightning import CausalLMModule
from lm_lightning.errors import RunError, is_open_ended
from lm_lightning.model.loss import causal_lm_nll, linear_cross_entropy

CONFIG = dict(vocab_size=256, n_layer=2, n_embd=32, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
CLIP = 1e-3  # far below the gradients' norm: every step is clipped


def _batches(n: int, seed: int, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 32), generator=g)
    return DataLoader(
        [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in x], batch_size=batch_size
    )


class _RecordsClippedNorm(CausalLMModule):
    """Records the total gradient norm after clipping (16-mixed: after unscaling, as the step sees it)."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.clipped_norms.append(torch.nn.utils.get_total_norm(grads).item())


def _module(**kwargs) -> _RecordsClippedNorm:
    module = _RecordsClippedNorm(model_config=CONFIG, learning_rate=1e-3, loss_chunk_size=8, **kwargs)
    module.clipped_norms = []
    return module


def _reference_perplexity(module: CausalLMModule, loader: DataLoader, trainer) -> float:
    """The same model in the same dtype and autocast, every batch's NLL summed in float64."""
    module.eval()
    total, count = 0.0, 0
    with torch.no_grad(), trainer.precision_plugin.forward_context():
        for batch in loader:
            nll, n = causal_lm_nll(
                module.model, batch["input_ids"], attention_mask=batch["attention_mask"], chunk_size=8
            )
            total, count = total + float(nll.double()), count + int(n)
    return math.exp(total / count)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true", "64-true"])
def test_precision_matrix_fits_clipped_resumes_validates_exactly_and_exports(tmp_path, precision):
    train, val = _batches(24, 0), _batches(24, 1)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=3)
    module = _module()
    first = quiet_trainer(
        tmp_path,
        precision=precision,
        max_steps=3,
        gradient_clip_val=CLIP,
        limit_val_batches=0,
        enable_checkpointing=True,
        callbacks=[checkpoints],
    )
    first.fit(module, train)
    optimizer = first.optimizers[0]
    assert optimizer.defaults["fused"] is True  # no GradScaler: the fused kernels, and clipping works
    assert len(module.clipped_norms) == 3
    assert all(n == pytest.approx(CLIP, rel=1e-2) for n in module.clipped_norms), module.clipped_norms

    resumed = _module()
    second = quiet_trainer(tmp_path, precision=precision, max_steps=5, gradient_clip_val=CLIP)
    second.fit(resumed, train, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert second.global_step == 5 and len(resumed.clipped_norms) == 2
    expected_dtype = {"bf16-true": torch.bfloat16, "64-true": torch.float64}.get(precision, torch.float32)
    assert resumed.model.lm_head.weight.dtype == expected_dtype

    ppl = second.validate(resumed, val, verbose=False)[0]["val/perplexity"]
    # The metric's state stays float64 / int64 although the plugin converted the module to its dtype.
    assert resumed.val_nll.nll_sum.dtype == torch.float64 and resumed.val_nll.n_tokens.dtype == torch.long
    assert ppl == pytest.approx(_reference_perplexity(resumed, val, second), rel=1e-4)

    out = resumed.export_hf(tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=expected_dtype)
    for (name, ours), theirs in zip(
        resumed.model.state_dict().items(), exported.state_dict().values(), strict=True
    ):
        assert torch.equal(ours, theirs), name


def test_16_mixed_uses_foreach_adamw_and_clips_unscaled_gradients(tmp_path):
    # fp16 autocast and a GradScaler exist on CPU through an explicit plugin (the CLI refuses 16-mixed there):
    # the optimizer choice and Lightning's unscale-then-clip path are those of a GPU.
    module = _module()
    plugin = MixedPrecision("16-mixed", "cpu")
    trainer = quiet_trainer(
        tmp_path, plugins=[plugin], max_steps=3, gradient_clip_val=CLIP, limit_val_batches=0
    )
    trainer.fit(module, _batches(12, 0))
    optimizer = trainer.optimizers[0]
    assert optimizer.defaults["fused"] is False and optimizer.defaults["foreach"] is True
    assert plugin.scaler.get_scale() > 1  # the gradients were scaled ...
    # ... and clipped after unscaling: the norm is the clip value, not the loss scale times it
    assert len(module.clipped_norms) == 3
    assert all(n == pytest.approx(CLIP, rel=1e-2) for n in module.clipped_norms), module.clipped_norms
    # Without clipping the fused kernels (which unscale inside their step) are allowed again.
    no_clip = _module()
    trainer = quiet_trainer(
        tmp_path, plugins=[MixedPrecision("16-mixed", "cpu")], max_steps=1, limit_val_batches=0
    )
    trainer.fit(no_clip, _batches(4, 0))
    assert trainer.optimizers[0].defaults["fused"] is True


def test_head_gradient_under_bf16_weights_is_accumulated_in_float32():
    torch.manual_seed(0)
    hidden = torch.randn(1024, 32).bfloat16()
    weight = (torch.randn(256, 32) * 0.3).bfloat16().requires_grad_()
    bias = torch.zeros(256).bfloat16().requires_grad_()
    targets = torch.randint(0, 256, (1024,))
    linear_cross_entropy(hidden, weight, bias, targets, 8).backward()  # 128 chunks
    w64, b64 = weight.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    F.cross_entropy(F.linear(hidden.double(), w64, b64), targets, reduction="sum").backward()
    for ours, ref in ((weight.grad, w64.grad), (bias.grad, b64.grad)):
        assert ours.dtype == torch.bfloat16
        # about 0.002 (rounding each chunk's logits' gradient, and the sum once); 0.013 summed in bf16
        assert (ours.double() - ref).norm() / ref.norm() < 0.005


def test_loss_chunk_size_counts_positions_of_every_sequence(monkeypatch):
    from lm_lightning.model import loss as loss_module

    seen = []
    monkeypatch.setattr(loss_module, "linear_cross_entropy", lambda *a: seen.append(a[4]) or a[0].sum() * 0)
    model = AutoModelForCausalLM.from_config(GPT2Config(**CONFIG))
    causal_lm_nll(model, torch.randint(0, 256, (3, 17)), chunk_size=4)
    assert seen == [3 * 4]  # 4 positions of each of the 3 sequences per chunk: 12 rows of logits


@pytest.mark.parametrize("limits", [{"max_epochs": -1}, {"max_time": {"seconds": 30}}])
def test_decaying_schedule_in_an_open_ended_run_asks_for_max_steps(tmp_path, limits):
    module = CausalLMModule(model_config=CONFIG, lr_scheduler="cosine")
    trainer = quiet_trainer(tmp_path, limit_val_batches=0, **limits)
    with pytest.raises(RunError, match="set --trainer.max_steps"):
        trainer.fit(module, _batches(8, 0))
    assert trainer.global_step == 0


def test_constant_schedule_runs_open_ended(tmp_path):
    module = CausalLMModule(model_config=CONFIG, lr_scheduler="constant", warmup_steps=2, learning_rate=1e-3)
    trainer = quiet_trainer(tmp_path, max_epochs=-1, max_time={"seconds": 2}, limit_val_batches=0)
    trainer.fit(module, _batches(8, 0))
    assert trainer.global_step > 2  # past the warm-up: the learning rate is the peak, not 0
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(1e-3)


def test_compile_runs_compiled_graphs_and_matches_eager():
    from torch._dynamo.utils import counters

    tiny = dict(CONFIG, n_layer=1, vocab_size=64, n_embd=16, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    modules = []
    for compile in (False, True):
        torch.manual_seed(0)
        module = CausalLMModule(model_config=tiny, compile=compile, loss_chunk_size=8)
        module.configure_model()
        modules.append(module)
    eager, compiled = modules
    assert list(eager.state_dict()) == list(compiled.state_dict())  # checkpoints unchanged by compile
    batch = {"input_ids": torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))}
    torch._dynamo.reset()
    counters.clear()
    losses = []
    for module in (eager, compiled, compiled):  # the second compiled step reuses the graphs
        module.zero_grad()
        nll, n, _ = module._nll(batch)
        (nll / n).backward()
        losses.append((nll / n).item())
        if len(losses) == 2:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["frames"]["ok"] >= 2 and graphs >= 2  # the trunk and the chunked loss
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[2] == pytest.approx(losses[0], rel=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_loss_takes_every_length_without_recompiling():
    """Fine-tuning batches change length almost every batch: 20 lengths (and two batch sizes), padded by the
    data module's collator, run through one compiled graph of the chunked loss, never the recompile limit
    (8: then dynamo falls back to eager), and give the eager loss and gradients."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list  # torch's own count of a code's graphs

    from lm_lightning.data.examples import PadCollator
    from lm_lightning.model import loss

    torch.manual_seed(0)
    tiny = dict(vocab_size=64, n_layer=1, n_embd=16, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = AutoModelForCausalLM.from_config(GPT2Config(**tiny, **no_dropout))
    g = torch.Generator().manual_seed(0)
    for i, length in enumerate(range(12, 52, 2)):
        rows = [torch.randint(1, 64, (length - 3 * j,), generator=g) for j in range(2 + i % 2)]
        batch = PadCollator(0)([{"input_ids": r, "labels": r} for r in rows])
        results = []
        for compile in (False, True):
            model.zero_grad()
            nll, n, _ = loss.causal_lm_loss(
                model, batch["input_ids"], batch["labels"], batch["attention_mask"], 8, compile=compile
            )
            (nll / n).backward()
            grads = [model.lm_head.weight.grad.clone(), model.transformer.wpe.weight.grad.clone()]
            results.append((nll.item(), grads))
        (eager, eager_grads), (compiled, compiled_grads) = results
        assert compiled == pytest.approx(eager, rel=1e-5)
        for a, b in zip(eager_grads, compiled_grads, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    # A graph per length would be 8 (the recompile limit) by now. (The test above may have compiled the
    # same graph: this model has its shapes.)
    assert 1 <= len(_debug_get_cache_entry_list(loss._chunk_loss.__code__)) <= 3


def test_which_trainer_limits_leave_the_length_unknown():
    assert not is_open_ended(None, -1)  # Lightning's default: 1000 epochs
    assert is_open_ended(-1, -1) and is_open_ended(None, -1, max_time="00:00:10:00")
    assert is_open_ended(1, -1, streaming=True)  # a streamed split has no length
    assert not is_open_ended(-1, 100) and not is_open_ended(None, 100, "00:00:10:00", streaming=True)


@pytest.mark.parametrize(
    ("cuda", "capabilities", "mkldnn", "expected", "why"),
    [
        (None, {"avx512_bf16": True, "amx_bf16": False, "avx512_f": True}, True, "bf16-mixed", "AVX512-BF16"),
        (None, {"avx512_bf16": True, "amx_bf16": True, "amx_tile": True}, True, "bf16-mixed", "AMX-BF16"),
        (None, {"avx512_f": True, "avx2": True, "avx512_bf16": False}, True, "32-true", "no native bf16"),
        (None, {"architecture": "aarch64", "bf16": True}, True, "32-true", "no native bf16"),  # not measured
        (None, {"avx512_bf16": True}, False, "32-true", "no native bf16"),  # torch built without oneDNN
        (None, None, True, "32-true", "no native bf16"),  # a torch without torch.cpu.get_capabilities
        (True, {"avx512_bf16": True}, True, "bf16-mixed", "GPU-X has bf16"),
        (False, {"avx512_bf16": True}, True, "32-true", "GPU-X has no bf16"),  # the GPU trains, not the CPU
    ],
)
def test_default_precision_follows_what_torch_reports(monkeypatch, cuda, capabilities, mkldnn, expected, why):
    from lm_lightning import precision

    monkeypatch.undo()  # conftest pins the CPU feature to None for in-process runs: here it is the subject
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda is not None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bool(cuda))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "GPU-X")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: mkldnn)
    if capabilities is None:
        monkeypatch.delattr(torch.cpu, "get_capabilities")
    else:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    resolved, reason = precision.resolve_precision()
    assert resolved == expected and why in reason and reason.startswith("default")
    assert precision.default_precision() == expected
    # an explicit --trainer.precision always wins
    for given in ("32-true", "bf16-mixed", "64-true"):
        assert precision.resolve_precision(given) == (given, "--trainer.precision")
    # what the run's start line says of its precision
    assert precision.precision_reason(expected) == reason
    assert precision.precision_reason("64-true") == "--trainer.precision"


@pytest.mark.parametrize(("feature", "expected"), [("AVX512-BF16", "bf16-mixed"), (None, "32-true")])
def test_cli_default_is_the_resolved_precision_and_the_flag_wins(monkeypatch, capsys, feature, expected):
    from lm_lightning import precision
    from lm_lightning.cli import cli_main

    monkeypatch.setattr(precision, "cpu_bf16_feature", lambda capabilities=None: feature)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for args, want in ([], expected), (["--trainer.precision", "64-true"], "64-true"):
        with pytest.raises(SystemExit):
            cli_main(["fit", "--print_config", *args])
        assert f"  precision: {want}\n" in capsys.readouterr().out
