"""QLoRA on a CUDA GPU: the check the GPU check command (issue "GPU paths that work") runs; no CPU equivalent.

``qlora_check()`` saves a tiny random Llama with its own tokenizer as a pretrained folder, then fine-tunes it
with ``CausalLMModule(lora={load_in_4bit: true})`` (a 4-bit NF4 base through bitsandbytes, bf16-mixed) and
checks, raising ``AssertionError`` on the first that fails:

- the base's linear layers are bitsandbytes ``Linear4bit`` and only the adapters train;
- the training loss is finite and falls;
- the checkpoint holds the adapters alone, and ``load_from_checkpoint`` gives the same logits;
- ``export`` merges the adapters into the base in full precision: ``from_pretrained`` of the folder gives
  the adapted model's logits within 4-bit quantization error (the base is quantized only in the adapted one).

    python bench/qlora_check.py      # needs a CUDA GPU and pip install bitsandbytes
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py` from the repository root


def qlora_check(workdir: str | None = None, steps: int = 30) -> dict[str, Any]:
    """Run the QLoRA checks above in ``workdir`` (a temporary folder by default); return the figures."""
    import lightning as L
    import torch
    from datasets import Dataset, DatasetDict
    from transformers import AutoConfig, AutoModelForCausalLM

    from lm_lightning import CausalLMDataModule, CausalLMModule
    from lm_lightning.data.corpus import python_docs_texts
    from lm_lightning.data.tokenizer import train_bpe_tokenizer

    assert torch.cuda.is_available(), "QLoRA needs a CUDA GPU"
    root = Path(workdir or tempfile.mkdtemp(prefix="qlora-check-"))
    texts = python_docs_texts()
    tokenizer = train_bpe_tokenizer(texts, 512, root / "tokenizer")
    config = AutoConfig.for_model(
        "llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    data = CausalLMDataModule(
        dataset=DatasetDict(
            {
                "train": Dataset.from_dict({"text": texts[:2000]}),
                "validation": Dataset.from_dict({"text": texts[2000:2200]}),
            }
        ),
        block_size=128,
        batch_size=8,
        cache_dir=str(root / "cache"),
    )
    module = CausalLMModule(
        model_name_or_path=str(root / "base"), lora={"r": 8, "load_in_4bit": True}, learning_rate=2e-3
    )
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        accelerator="cuda", devices=1, precision="bf16-mixed", max_steps=steps, logger=False,
        enable_checkpointing=False, limit_val_batches=0, callbacks=[Record()], default_root_dir=str(root),
    )  # fmt: skip
    trainer.fit(module, data)
    import bitsandbytes as bnb

    base = module.model.get_base_model()
    n_4bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    assert n_4bit > 0, "no 4-bit linear layer in the base"
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), trainable[:5]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first, (first, last)

    ckpt = root / "qlora.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert all("lora_" in k for k in state), [k for k in state if "lora_" not in k][:5]
    ids = data.datasets["validation"][:2]["input_ids"].cuda()
    module.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        adapted = module.model(input_ids=ids).logits.float()
        restored = CausalLMModule.load_from_checkpoint(ckpt, weights_only=True).cuda().eval()
        reloaded = restored.model(input_ids=ids).logits.float()
    assert torch.allclose(reloaded, adapted, atol=1e-3), (reloaded - adapted).abs().max()

    restored.export_hf(root / "merged")
    merged = AutoModelForCausalLM.from_pretrained(root / "merged").cuda().eval()
    with torch.no_grad():
        exported = merged(input_ids=ids).logits.float()
    error = ((exported - adapted).abs().max() / adapted.abs().max()).item()
    assert error < 0.1, error  # the adapted model's base is 4-bit; the export's is full precision
    return {"steps": steps, "loss_first5": first, "loss_last5": last, "linear4bit": n_4bit,
            "ckpt_bytes": ckpt.stat().st_size, "export_rel_error": error}  # fmt: skip


if __name__ == "__main__":
    print(qlora_check())
