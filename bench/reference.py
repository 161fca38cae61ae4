"""THE REFERENCE: the Hugging Face notebook "Fine-tuning a language model", as the notebook writes it.

This is the baseline the benchmarks compare ``lm_lightning`` against, kept as close to the notebook's cells as
the offline setting allows (local files instead of the hub, ``max_new_tokens`` where the blog post uses
``max_length``). Do not optimise it: its costs are the point.
"""

from __future__ import annotations

from typing import Any

import torch
from datasets import DatasetDict, load_dataset
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments


def prepare_blocks(
    tokenizer_path: str, data_files: dict[str, str], block_size: int, num_proc: int | None
) -> DatasetDict:
    """The notebook's data cells: load, ``map(tokenize_function)``, ``map(group_texts, batch_size=1000)``."""
    datasets = load_dataset("parquet", data_files=data_files)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, use_fast=True)

    def tokenize_function(examples):
        return tokenizer(examples["text"])

    tokenized_datasets = datasets.map(
        tokenize_function, batched=True, num_proc=num_proc, remove_columns=["text"]
    )

    def group_texts(examples):
        # Concatenate all texts.
        concatenated_examples = {k: sum(examples[k], []) for k in examples.keys()}  # noqa: SIM118 (verbatim)
        total_length = len(concatenated_examples[list(examples.keys())[0]])
        # We drop the small remainder, we could add padding if the model supported it instead of this drop,
        # you can customize this part to your needs.
        total_length = (total_length // block_size) * block_size
        # Split by chunks of max_len.
        result = {
            k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
            for k, t in concatenated_examples.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    return tokenized_datasets.map(group_texts, batched=True, batch_size=1000, num_proc=num_proc)


def training_arguments(output_dir: str, max_steps: int, **overrides: Any) -> TrainingArguments:
    """The notebook's ``TrainingArguments`` (lr 2e-5, weight decay 0.01; batch size 8 is the default).

    Changed for a benchmark: a fixed number of steps, no evaluation, no checkpoints, no hub push; the rest
    (fused AdamW, linear decay, gradient clipping at 1.0, logging every 500 steps) are the defaults.
    """
    args = {
        "learning_rate": 2e-5,
        "weight_decay": 0.01,
        "max_steps": max_steps,
        "eval_strategy": "no",
        "save_strategy": "no",
        "push_to_hub": False,
        "report_to": "none",
        **overrides,
    }
    return TrainingArguments(output_dir, **args)


def trainer(model: PreTrainedModel, args: TrainingArguments, train_dataset: Any, callbacks: list) -> Trainer:
    """The notebook's ``Trainer`` (model, arguments, the train blocks)."""
    return Trainer(model=model, args=args, train_dataset=train_dataset, callbacks=callbacks)


@torch.no_grad()
def eval_loss(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """What ``Trainer.evaluate`` computes per batch: ``model(input_ids, labels=...)``, full float32 logits."""
    return model(input_ids=input_ids, labels=input_ids).loss


@torch.no_grad()
def generate_one_at_a_time(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], **generate_kwargs: Any
) -> list[tuple[str, int]]:
    """The blog post's way, one prompt at a time: ``tokenizer.encode(prompt)``, ``model.generate(input_ids)``.

    Returns, per prompt, the continuation without the prompt (``skip_special_tokens=True``) and the number of
    tokens generated.
    """
    results = []
    for prompt in prompts:
        input_ids = tokenizer.encode(prompt, return_tensors="pt")
        output = model.generate(input_ids, pad_token_id=tokenizer.eos_token_id, **generate_kwargs)
        new_ids = output[0, input_ids.shape[1] :]
        results.append((tokenizer.decode(new_ids, skip_special_tokens=True), len(new_ids)))
    return results
