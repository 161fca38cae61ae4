"""LoRA through peft: only adapters train, checkpoints hold them alone, resume is exact, export merges."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import quiet_trainer
from datasets import Dataset, DatasetDict
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import PeftModel
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from lm_lightning import (
    CausalLMDataModule,
    CausalLMModule,
    TextGenerationCallback,
    cli_main,
    export_checkpoint,
)
from lm_lightning.errors import RunError
from lm_lightning.model.lora import LoraSettings, apply_lora, default_target_modules, merged_model
from lm_lightning.model.loss import causal_lm_nll
from lm_lightning.model.optim import parameter_groups

LORA = {"r": 4, "alpha": 8, "dropout": 0.1}


@pytest.fixture
def base_folder(tmp_path, bpe_tokenizer) -> str:
    """A tiny pretrained GPT-2 (tied head, dropout on) with its own tokenizer."""
    torch.manual_seed(0)
    eos = bpe_tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(bpe_tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=eos,
        eos_token_id=eos,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    bpe_tokenizer.save_pretrained(tmp_path / "base")
    return str(tmp_path / "base")


def _data(tmp_path, doc_texts) -> CausalLMDataModule:
    texts = DatasetDict(
        {
            "train": Dataset.from_dict({"text": doc_texts[:60]}),
            "validation": Dataset.from_dict({"text": doc_texts[60:70]}),
        }
    )
    return CausalLMDataModule(dataset=texts, block_size=32, batch_size=4, cache_dir=str(tmp_path / "cache"))


def _fit(tmp_path, base_folder, doc_texts, max_steps, ckpt_path=None, callbacks=()):
    L.seed_everything(3)
    module = CausalLMModule(model_name_or_path=base_folder, lora=LORA, learning_rate=1e-2, weight_decay=0.1)
    trainer = quiet_trainer(
        tmp_path,
        max_steps=max_steps,
        limit_val_batches=0,
        callbacks=list(callbacks),
        enable_checkpointing=True,
    )
    trainer.fit(module, _data(tmp_path, doc_texts), ckpt_path=ckpt_path)
    return module, trainer


def _adapters(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.model.named_parameters() if v.requires_grad}


def test_lora_trains_adapters_only_saves_them_alone_resumes_exactly_and_exports(
    tmp_path, base_folder, doc_texts
):
    every_2 = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=2, save_top_k=-1, monitor=None)
    straight, trainer = _fit(tmp_path, base_folder, doc_texts, 4, callbacks=[every_2])
    adapters = _adapters(straight)
    assert adapters and all(".lora_A." in k or ".lora_B." in k for k in adapters)  # c_attn, peft's default
    assert all("c_attn" in k for k in adapters)
    base = AutoModelForCausalLM.from_pretrained(base_folder).state_dict()
    merged_names = {k.replace("base_model.model.", "").replace("base_layer.", ""): v for k, v in
                    straight.model.state_dict().items() if "lora_" not in k}  # fmt: skip
    assert all(torch.equal(merged_names[k], v) for k, v in base.items())  # the base did not move
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in adapters.items())
    # Weight decay follows the same rules: the adapters' matrices decay, nothing frozen is in a group.
    decay, no_decay = parameter_groups(straight.model, 0.1)
    assert {id(p) for p in decay["params"]} == {id(p) for p in straight.model.parameters() if p.requires_grad}
    assert no_decay["params"] == []

    # Resumed from the checkpoint of step 2: the same adapters as the straight run (dropout is on).
    (ckpt,) = (tmp_path / "ckpts").glob("*step=2.ckpt")
    checkpoint = torch.load(ckpt, weights_only=True)
    n_trainable = sum(v.numel() for v in adapters.values())
    assert all("lora_" in k for k in checkpoint["state_dict"])  # the adapters alone
    assert sum(v.numel() for v in checkpoint["state_dict"].values()) == n_trainable
    moments = [s["exp_avg"].numel() for s in checkpoint["optimizer_states"][0]["state"].values()]
    assert sum(moments) == n_trainable
    resumed, _ = _fit(tmp_path, base_folder, doc_texts, 4, ckpt_path=str(ckpt))
    assert all(torch.equal(resumed_value, adapters[k]) for k, resumed_value in _adapters(resumed).items())

    # Export: merged (plain transformers, same logits) by default; the adapter folder on request.
    straight.eval()
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = straight.model(input_ids=ids).logits
    (four,) = (tmp_path / "ckpts").glob("*step=4.ckpt")
    export_checkpoint(ckpt_path=str(four), output_dir=str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in k for k in merged.state_dict())
    export_checkpoint(ckpt_path=str(four), output_dir=str(tmp_path / "adapter"), adapter_only=True)
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_folder), tmp_path / "adapter"
    )
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=0, atol=1e-5)
        assert torch.equal(reloaded.eval()(input_ids=ids).logits, adapted)
        # Under QLoRA the adapters are merged into the base loaded again in full precision (a CPU stand-in
        # here: the flag alone picks that path).
        qlora = LoraSettings(**{**LORA, "load_in_4bit": True})
        remerged = merged_model(straight.model, qlora, base_folder).eval()
        torch.testing.assert_close(remerged(input_ids=ids).logits, adapted, rtol=0, atol=1e-5)

    # Adapters put on another base (same shapes, another config) are refused, not silently misapplied.
    other = AutoModelForCausalLM.from_pretrained(base_folder)
    other.config.layer_norm_epsilon = 1e-3
    other.save_pretrained(base_folder)
    with pytest.raises(RunError, match="another base model"):
        CausalLMModule.load_from_checkpoint(four, weights_only=True)


def test_lora_chunked_loss_gradients_and_generation_go_through_the_adapters(tmp_path, base_folder, doc_texts):
    torch.manual_seed(0)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(base_folder), LoraSettings(r=4, dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero (the identity); make the adapters matter
                param.normal_(0, 0.5)
    ids = torch.randint(0, 512, (3, 30))

    def grads(chunk_size):
        model.zero_grad(set_to_none=True)
        nll, n = causal_lm_nll(model, ids, chunk_size=chunk_size)
        (nll / n).backward()
        return nll.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    full_nll, full = grads(None)
    chunked_nll, chunked = grads(7)
    assert torch.allclose(full_nll, chunked_nll, rtol=1e-5)
    assert full.keys() == chunked.keys() == {k for k, p in model.named_parameters() if p.requires_grad}
    for name in full:
        torch.testing.assert_close(full[name], chunked[name], rtol=1e-4, atol=1e-7)

    callback = TextGenerationCallback(prompts=["The for"], decodings=["greedy"], max_new_tokens=4)
    module, trainer = _fit(tmp_path, base_folder, doc_texts, 1, callbacks=[callback])
    (sample,) = callback.sample(trainer, module)
    assert sample.num_new_tokens > 0


def test_default_targets_fall_back_to_every_linear_layer_but_the_head():
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "phi3", vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, pad_token_id=0,
    )  # fmt: skip
    assert default_target_modules(AutoModelForCausalLM.from_config(config)) == [
        "down_proj",
        "gate_up_proj",
        "o_proj",
        "qkv_proj",
    ]


def test_lora_settings_errors(tmp_path, base_folder, capsys):
    with pytest.raises(ValueError, match="LoRA adapts pretrained weights"):
        CausalLMModule(model_config={"n_layer": 1}, lora={"r": 8})
    with pytest.raises(ValueError, match="lora.r=0"):
        CausalLMModule(model_name_or_path=base_folder, lora={"r": 0})
    with pytest.raises(RunError, match="matches no module"):
        CausalLMModule(model_name_or_path=base_folder, lora={"target_modules": ["q_proj"]}).configure_model()
    with pytest.raises(RunError, match="adapter_only=true"):
        CausalLMModule(model_name_or_path=base_folder).export_hf(tmp_path / "x", adapter_only=True)
    # QLoRA on a CPU: refused before anything is loaded, naming the setting and the way out.
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--model.model_name_or_path", base_folder, "--model.lora", "{load_in_4bit: true}",
                  "--data.corpus", "python-docs", "--trainer.accelerator", "cpu",
                  "--data.cache_dir", str(tmp_path / "cache")])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "lora.load_in_4bit=true" in err and "CUDA" in err and not (tmp_path / "cache").exists()


def test_lora_recipe_settings_reach_the_module(tmp_path):
    cli = cli_main(
        ["--config", "configs/gpt2-wikitext2-lora.yaml", "--trainer.accelerator", "cpu"], run=False
    )
    assert cli.model.lora == LoraSettings(r=8, alpha=16, dropout=0.05, target_modules=None, bias="none")
    assert cli.model.hparams.lora["r"] == 8 and cli.datamodule.tokenizer_spec == "gpt2"
