"""Preference tuning: pair formats and bad rows, the DPO losses against a plain PyTorch DPO, the three
reference paths, exact resume, the recipe, export and predict."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer, run_cli, write_tiny_config
from datasets import Dataset, DatasetDict
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from lm_lightning import CausalLMDataModule, CausalLMModule, export_checkpoint
from lm_lightning.data.corpus import python_docs_pairs
from lm_lightning.data.formats import (
    IGNORE_INDEX,
    ROW_COLUMN,
    detect_format,
    encode_chat,
    encode_prompt_completion,
)
from lm_lightning.data.preference import PairCollator, PairEncoder, encode_pair
from lm_lightning.errors import RunError
from lm_lightning.model.preference import disable_dropout
from lm_lightning.model.reference import REFERENCE_KEY, Reference, load_reference_model
from lm_lightning.model.sharded import FSDP2Strategy

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_MARKED = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LORA = {"r": 4, "alpha": 8, "dropout": 0.1}
USER = {"role": "user", "content": "Q"}


@pytest.fixture
def base_folder(tmp_path, bpe_tokenizer) -> str:
    """A tiny pretrained GPT-2 (dropout on, which DPO turns off) with its own tokenizer."""
    torch.manual_seed(0)
    eos = bpe_tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(bpe_tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=eos,
        eos_token_id=eos,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    bpe_tokenizer.save_pretrained(tmp_path / "base")
    return str(tmp_path / "base")


@pytest.fixture(scope="module")
def pairs() -> DatasetDict:
    """24 training and 8 validation text pairs of the built-in corpus (sides of many lengths)."""
    data = python_docs_pairs()
    return DatasetDict(
        {
            "train": Dataset.from_dict({k: v[:24] for k, v in data.items()}),
            "validation": Dataset.from_dict({k: v[100:108] for k, v in data.items()}),
        }
    )


def _data(tmp_path, pairs, **kwargs) -> CausalLMDataModule:
    kwargs = {"block_size": 48, "batch_size": 4, "cache_dir": str(tmp_path / "cache"), **kwargs}
    return CausalLMDataModule(dataset=pairs, **kwargs)


def _dpo(base_folder, **kwargs) -> CausalLMModule:
    return CausalLMModule(model_name_or_path=base_folder, objective="dpo", learning_rate=1e-3, **kwargs)


# ----------------------------------------------------------------------------- data
def test_pairs_are_detected_and_encoded_as_prompt_completion_and_chats(bpe_tokenizer):
    assert detect_format(["prompt", "chosen", "rejected"], "text", "auto", "train") == "preference"
    assert detect_format(["chosen", "rejected", "id"], "text", "auto", "train") == "preference"
    with pytest.raises(ValueError, match="has a 'chosen' column but no 'rejected' column"):
        detect_format(["prompt", "chosen"], "text", "auto", "train")
    tok = bpe_tokenizer
    row = {"prompt": "Explain the for statement.\n", "chosen": "It loops.", "rejected": "It waits."}
    out = encode_pair(tok, row, None, "here")
    for side in ("chosen", "rejected"):
        ids, labels = encode_prompt_completion(tok, row["prompt"], row[side], True, "here")
        assert (out[f"{side}_input_ids"], out[f"{side}_labels"]) == (ids, labels)

    # Chats: the shared conversation (an earlier assistant turn included) carries no target; the answers do.
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    shared = [
        {"role": "user", "content": "What does for do?"},
        {"role": "assistant", "content": "It iterates."},
        {"role": "user", "content": "And while?"},
    ]
    good, bad = {"role": "assistant", "content": "It loops."}, {"role": "assistant", "content": "No idea."}
    implicit = {"chosen": [*shared, good], "rejected": [*shared, bad]}
    explicit = {"prompt": shared, "chosen": [good], "rejected": [bad]}
    for template in (CHATML, CHATML_MARKED):
        a, b = encode_pair(tok, implicit, template, "here"), encode_pair(tok, explicit, template, "here")
        assert a == b
        for side, answer in (("chosen", good), ("rejected", bad)):
            ids, all_turns = encode_chat(tok, [*shared, answer], template, True, "here")
            assert a[f"{side}_input_ids"] == ids
            targets = tok.decode([t for t in a[f"{side}_labels"] if t != IGNORE_INDEX])
            assert targets == answer["content"] + "<|im_end|>"  # this answer alone, not "It iterates."
            assert "It iterates." in tok.decode([t for t in all_turns if t != IGNORE_INDEX])


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "Q?", "chosen": " ", "rejected": "B"}, "'chosen' is empty"),
        ({"prompt": "Q?", "chosen": "A", "rejected": ""}, "'rejected' is empty"),
        ({"prompt": "Q?", "chosen": "A", "rejected": "A"}, "'chosen' equals 'rejected'"),
        ({"prompt": None, "chosen": "A", "rejected": "B"}, "text pairs need a 'prompt' column"),
        (
            {"prompt": None, "chosen": [{"role": "user", "content": "Q"}], "rejected": "B"},
            "must both be texts or both chats",
        ),
        (
            {"prompt": None, "chosen": [USER, {"role": "assistant", "content": "A"}],
             "rejected": [USER, {"role": "assistant", "content": "A"}]},
            "'chosen' equals 'rejected'",
        ),
        (
            {"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": ""}],
             "rejected": [{"role": "assistant", "content": "B"}]},
            "'chosen' has no assistant answer after the shared conversation",
        ),
    ],
)  # fmt: skip
def test_a_bad_pair_names_its_split_and_row(bpe_tokenizer, row, message):
    encoder = PairEncoder(bpe_tokenizer, CHATML, "train")
    batch = {key: [value] for key, value in row.items() if value is not None} | {ROW_COLUMN: [7]}
    with pytest.raises(ValueError, match=message) as info:
        encoder(batch)
    assert "The 'train' split, row 7" in str(info.value)


def test_a_bad_pair_fails_the_cli_with_exit_2_and_writes_nothing(
    tmp_path, bpe_tokenizer_path, doc_texts, monkeypatch, capfd
):
    monkeypatch.chdir(tmp_path)
    rows = [{"prompt": f"Q{i}?", "chosen": f"A{i}.", "rejected": f"B{i}."} for i in range(3)]
    rows[2]["rejected"] = rows[2]["chosen"]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_tiny_config(tmp_path, bpe_tokenizer_path, doc_texts)
    files = ["--data.data_files.train", "pairs.jsonl", "--data.data_files.validation", "pairs.jsonl"]
    assert run_cli(monkeypatch, "fit", "--config", "tiny.yaml", *files) == 2
    err = capfd.readouterr().err
    assert "The 'train' split, row 2 (counting from 0): 'chosen' equals 'rejected'" in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


# ----------------------------------------------------------------------------- the losses
def _plain_logp(model, ids, labels):
    """Sum of the target tokens' log-probabilities of one sequence, from the model's full logits."""
    logits = model(input_ids=ids[None]).logits[0, :-1].float()
    targets = labels[1:]
    keep = targets != IGNORE_INDEX
    return torch.log_softmax(logits, -1)[keep].gather(1, targets[keep, None]).sum(), keep.sum()


def _plain_dpo(policy, reference, rows, beta, loss, eps):
    """DPO written plainly: each sequence alone, full logits, trl's formulas; the mean loss, the rewards."""
    losses, chosen_rewards, rejected_rewards = [], [], []
    for row in rows:
        pc, nc = _plain_logp(policy, row["chosen_input_ids"], row["chosen_labels"])
        pr, nr = _plain_logp(policy, row["rejected_input_ids"], row["rejected_labels"])
        with torch.no_grad():
            rc, _ = _plain_logp(reference, row["chosen_input_ids"], row["chosen_labels"])
            rr, _ = _plain_logp(reference, row["rejected_input_ids"], row["rejected_labels"])
        d = (pc - rc) - (pr - rr)
        if loss == "sigmoid":
            losses.append(-(1 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d))
        elif loss == "hinge":
            losses.append(torch.relu(1 - beta * d))
        else:  # ipo: the log-ratios averaged over each side's completion tokens
            losses.append(((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2)
        chosen_rewards.append(beta * (pc - rc).detach())
        rejected_rewards.append(beta * (pr - rr).detach())
    return torch.stack(losses).mean(), torch.stack(chosen_rewards), torch.stack(rejected_rewards)


@pytest.mark.parametrize("loss, eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
def test_dpo_loss_and_gradient_equal_a_plain_pytorch_dpo(base_folder, bpe_tokenizer, loss, eps):
    beta = 0.5
    module = _dpo(base_folder, dpo={"beta": beta, "loss": loss, "label_smoothing": eps}, loss_chunk_size=3)
    module.configure_model()
    disable_dropout(module.model)
    module.reference = Reference(model=load_reference_model(module))  # the starting model, frozen
    data = python_docs_pairs()
    rows = []
    for i in (3, 40, 77, 120):  # sides of different lengths, cut to at most 40 tokens
        encoded = encode_pair(bpe_tokenizer, {k: v[i] for k, v in data.items()}, None, "here")
        rows.append({k: torch.tensor(v[:40]) for k, v in encoded.items()} | {"pair_id": torch.tensor(i)})
    batch = PairCollator(bpe_tokenizer.pad_token_id or 0)(rows)
    assert batch["input_ids"].shape[0] == 8 and (batch["labels"] == IGNORE_INDEX).any()

    with torch.no_grad():  # policy = reference: r_c = r_r = 0
        start = module.preference_step(batch, 0)  # no trainer: one micro-batch is the step, its mean
        _, chosen, rejected, _, _ = module.pair_step(batch, "train")
    assert start.item() == pair_start_loss(loss, beta).item()
    assert chosen.eq(0).all() and rejected.eq(0).all()

    with torch.no_grad():  # the policy moves away from the reference
        for p in module.model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    objective = module.preference_step(batch, 0)
    objective.backward()
    ours = {n: p.grad.clone() for n, p in module.model.named_parameters()}
    module.model.zero_grad()
    with torch.no_grad():
        losses, our_chosen, our_rejected, _, _ = module.pair_step(batch, "train")
    plain, chosen, rejected = _plain_dpo(module.model, module.reference.model, rows, beta, loss, eps)
    plain.backward()
    # The log-ratios are differences of float32 sums of ~250 (an ulp there is 1.5e-5), chunked or not.
    torch.testing.assert_close(objective, plain, rtol=0, atol=5e-5)
    torch.testing.assert_close(losses.mean(), plain, rtol=0, atol=5e-5)
    torch.testing.assert_close(our_chosen, chosen, rtol=0, atol=1e-4)
    torch.testing.assert_close(our_rejected, rejected, rtol=0, atol=1e-4)
    assert max(g.abs().max() for g in ours.values()) > 1e-4
    for name, p in module.model.named_parameters():  # float32 sums in other orders: to 2e-5 of the largest
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=2e-5 * p.grad.abs().max(), msg=name)


def pair_start_loss(loss: str, beta: float) -> torch.Tensor:
    """A pair's loss when policy = reference: log 2 (sigmoid, any smoothing), 1 (hinge), 1 / (4 beta^2) (ipo),
    in float32."""
    return torch.tensor({"sigmoid": math.log(2), "hinge": 1.0, "ipo": 1 / (4 * beta**2)}[loss])


# ----------------------------------------------------------------------------- the reference
def test_the_three_reference_paths_start_at_log_2_with_zero_rewards(tmp_path, base_folder, pairs):
    paths = {
        "frozen copy": {},
        "lora": {"lora": LORA},
        "precomputed": {"dpo": {"precompute_reference": True}},
    }
    results = {}
    for name, kwargs in paths.items():
        module = _dpo(base_folder, **kwargs)
        results[name] = quiet_trainer(tmp_path).validate(module, _data(tmp_path, pairs), verbose=False)[0]
        assert (module.reference.model is not None) == (name == "frozen copy")
        assert (module.reference.tables is not None) == (name == "precomputed")
    assert list((tmp_path / "cache").rglob("reference/*.pt"))  # stored with the cached data
    for name, result in results.items():
        assert result["val/loss"] == float(pair_start_loss("sigmoid", 0.1)), name  # exactly log 2
        assert result["val/rewards/chosen"] == result["val/rewards/rejected"] == 0.0, name
        assert result["val/rewards/margin"] == result["val/rewards/accuracy"] == 0.0, name
        for key, value in results["frozen copy"].items():
            assert result[key] == pytest.approx(value, abs=1e-5), (name, key)
    # val/perplexity is that of the chosen completions: the SFT perplexity of the same pairs.
    sft = DatasetDict(
        {s: d.rename_column("chosen", "completion").remove_columns("rejected") for s, d in pairs.items()}
    )
    lm = CausalLMModule(model_name_or_path=base_folder)
    lm_result = quiet_trainer(tmp_path).validate(lm, _data(tmp_path, sft), verbose=False)[0]
    assert results["lora"]["val/perplexity"] == pytest.approx(lm_result["val/perplexity"], rel=1e-5)


def _fit(tmp_path, base_folder, pairs, max_steps, ckpt_path=None, callbacks=(), **kwargs):
    L.seed_everything(3)
    module = _dpo(base_folder, **kwargs)
    trainer = quiet_trainer(
        tmp_path,
        max_steps=max_steps,
        limit_val_batches=0,
        callbacks=list(callbacks),
        enable_checkpointing=True,
    )
    trainer.fit(module, _data(tmp_path, pairs), ckpt_path=ckpt_path)
    return module


def _weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def test_dpo_resumes_exactly_and_checkpoints_hold_no_reference(tmp_path, base_folder, pairs):
    every_2 = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=2, save_top_k=-1, monitor=None)
    precomputed = {"dpo": {"precompute_reference": True}}
    straight = _weights(_fit(tmp_path, base_folder, pairs, 4, callbacks=[every_2], **precomputed))
    (ckpt,) = (tmp_path / "ckpts").glob("*step=2.ckpt")
    checkpoint = torch.load(ckpt, weights_only=True)
    assert {k.removeprefix("model.") for k in checkpoint["state_dict"]} == set(straight)  # the policy alone
    assert checkpoint[REFERENCE_KEY] and checkpoint["hyper_parameters"]["objective"] == "dpo"

    # The stored reference, found by the key in the checkpoint: the same weights as the straight run.
    resumed = _fit(tmp_path, base_folder, pairs, 4, ckpt_path=str(ckpt), **precomputed)
    assert all(torch.equal(v, straight[k]) for k, v in _weights(resumed).items())
    # Lost from the cache: computed again from model_name_or_path (not from the checkpoint's policy).
    for file in (tmp_path / "cache").rglob("reference/*.pt"):
        file.unlink()
    resumed = _fit(tmp_path, base_folder, pairs, 4, ckpt_path=str(ckpt), **precomputed)
    assert all(torch.equal(v, straight[k]) for k, v in _weights(resumed).items())
    # A frozen copy instead: the starting model again, the same updates to rounding.
    resumed = _fit(tmp_path, base_folder, pairs, 4, ckpt_path=str(ckpt))
    assert all(torch.allclose(v, straight[k], atol=1e-5) for k, v in _weights(resumed).items())
    start = AutoModelForCausalLM.from_pretrained(base_folder).state_dict()
    assert all(torch.equal(v, start[k]) for k, v in resumed.reference.model.state_dict().items())


# ----------------------------------------------------------------------------- settings
def test_dpo_settings_and_runs_it_cannot_do_are_refused(base_folder):
    with pytest.raises(ValueError, match="label_smoothing=0.1 is for the sigmoid loss"):
        _dpo(base_folder, dpo={"loss": "ipo", "label_smoothing": 0.1})
    with pytest.raises(ValueError, match="dpo.loss='kto' is unknown"):
        _dpo(base_folder, dpo={"loss": "kto"})
    with pytest.raises(ValueError, match="dpo is set but objective='lm'"):
        CausalLMModule(model_name_or_path=base_folder, dpo={"beta": 0.2})
    with pytest.raises(ValueError, match="trained from scratch: set --model.model_name_or_path"):
        CausalLMModule(model_config={"n_layer": 1}, objective="dpo")
    module = _dpo(base_folder)
    fsdp = SimpleNamespace(strategy=FSDP2Strategy(), datamodule=None)
    module._trainer = fsdp
    with pytest.raises(RunError, match="does not run under FSDP2"):
        module.setup("fit")
    module._trainer = SimpleNamespace(
        strategy=None, datamodule=SimpleNamespace(data_format="prompt_completion")
    )
    with pytest.raises(RunError, match="this data is 'prompt_completion'"):
        module.setup("fit")
    lm = CausalLMModule(model_name_or_path=base_folder)
    lm._trainer = SimpleNamespace(strategy=None, datamodule=SimpleNamespace(data_format="preference"))
    with pytest.raises(RunError, match="set --model.objective dpo"):
        lm.setup("fit")


# ----------------------------------------------------------------------------- recipe, export, predict
def test_dpo_recipe_separates_chosen_from_rejected_then_exports_and_predicts(
    tmp_path, base_folder, monkeypatch
):
    """The shipped recipe, with the SFT model swapped for a tiny GPT-2 folder."""
    from lm_lightning.cli import cli_main

    monkeypatch.chdir(tmp_path)
    config = Path(__file__).parents[1] / "configs" / "dpo-python-docs.yaml"
    cli = cli_main(
        ["--config", str(config), "--model.model_name_or_path", base_folder, "--data.tokenizer", base_folder,
         "--data.block_size", "48", "--data.cache_dir", "cache", "--trainer.accelerator", "cpu",
         "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "10", "--model.export_dir", "null",
         "--model.learning_rate", "3e-2", "--trainer.logger", "false", "--trainer.callbacks", "[]",
         "--checkpoint.dirpath", "ckpts"],
        run=False,
    )  # fmt: skip
    trainer, module, data = cli.trainer, cli.model, cli.datamodule
    held_out = trainer.validate(module, data, verbose=False)[0]  # policy = reference
    assert (
        held_out["val/loss"] == float(pair_start_loss("sigmoid", 0.1)) and held_out["val/rewards/margin"] == 0
    )
    trainer.fit(module, data)
    assert data.data_format == "preference" and set(held_out) <= set(trainer.callback_metrics)
    # The pairs it trained on: a random tiny model learns them (the README: the SFT model's held-out pairs).
    seen = trainer.validate(module, data.train_dataloader(), verbose=False)[0]
    assert seen["val/loss"] < held_out["val/loss"] and seen["val/rewards/margin"] > 0
    assert seen["val/rewards/accuracy"] > 0.5
    assert seen["val/perplexity_rejected"] / seen["val/perplexity"] > 1

    # Export: the policy, merged under LoRA; predict from the DPO checkpoint.
    last = tmp_path / "ckpts" / "last.ckpt"
    export_checkpoint(ckpt_path=str(last), output_dir=str(tmp_path / "exported"))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        policy = module.model.eval()(input_ids=ids).logits
        torch.testing.assert_close(exported(input_ids=ids).logits, policy, rtol=0, atol=1e-5)
    args = ["predict", "--ckpt_path", str(last), "--data.prompts", '["Explain the for statement.\\n"]',
            "--predictions.output_path", "out.jsonl", "--trainer.logger", "false"]  # fmt: skip
    assert run_cli(monkeypatch, *args) == 0
    (record,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert record["prompt"] == "Explain the for statement.\n" and record["num_new_tokens"] > 0
