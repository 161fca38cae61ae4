"""lm-evaluation-harness: the evaluate command, its local task, exactness against our loss, LoRA, callback."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from conftest import quiet_trainer, run_cli, write_tiny_config
from datasets import Dataset, DatasetDict
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from transformers import GPT2Config, GPT2LMHeadModel

from lm_lightning import CausalLMDataModule, CausalLMModule, HarnessEvalCallback, TextGenerationCallback
from lm_lightning.data.corpus import python_docs_qa
from lm_lightning.data.formats import encode_prompt_completion
from lm_lightning.evaluation.local_tasks import python_docs_mc
from lm_lightning.model.loss import causal_lm_nll

# A task of the user's own, on a local JSONL file: what the README tells users to write.
USER_TASK = """\
task: capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""
CAPITALS = [
    {"question": "The capital of France is", "choices": ["Paris", "Rome", "Oslo"], "label": 0},
    {"question": "The capital of Italy is", "choices": ["Paris", "Rome", "Oslo"], "label": 1},
    {"question": "The capital of Norway is", "choices": ["Paris", "Rome", "Oslo"], "label": 2},
]


def _fit_tiny(tmp_path: Path, monkeypatch, tokenizer_path: str, texts: list[str]) -> None:
    """A from-scratch 1-layer GPT-2 trained 2 steps with the CLI in ``tmp_path`` (runs/tiny/version_0)."""
    config = write_tiny_config(tmp_path, tokenizer_path, texts)
    settings = yaml.safe_load(config.read_text())
    settings["model"]["model_config"]["n_positions"] = 256  # a question and a choice of the local task fit
    config.write_text(yaml.safe_dump(settings))
    monkeypatch.chdir(tmp_path)
    assert run_cli(monkeypatch, "fit", "--config", "tiny.yaml", "--trainer.enable_progress_bar", "false") == 0


def _samples_loglikelihoods(path: Path, task: str) -> list[float]:
    samples = json.loads(path.read_text())["samples"][task]
    return [resp[0] for sample in samples for resp in sample["filtered_resps"]]


def test_local_task_is_deterministic_multiple_choice_over_python_docs_qa():
    pairs, docs = python_docs_qa(), python_docs_mc()["test"]
    assert len(docs) == len(pairs["prompt"]) and docs[:] == python_docs_mc()["test"][:]  # same on every call
    labels = set()
    for doc, prompt, answer in zip(docs, pairs["prompt"], pairs["completion"], strict=True):
        assert doc["question"] == prompt.rstrip() and len(set(doc["choices"])) == 4
        right = doc["choices"][doc["label"]]
        assert answer.startswith(right)  # the opening of the question's own answer, the others' differ
        assert all(not answer.startswith(c) for i, c in enumerate(doc["choices"]) if i != doc["label"])
        labels.add(doc["label"])
    assert labels == {0, 1, 2, 3}


def test_evaluate_cli_scores_the_local_task_and_a_users_task_on_the_last_checkpoint(
    tmp_path, monkeypatch, capsys, bpe_tokenizer_path, doc_texts
):
    _fit_tiny(tmp_path, monkeypatch, bpe_tokenizer_path, doc_texts)
    (tmp_path / "my_tasks").mkdir()
    (tmp_path / "capitals.jsonl").write_text("".join(json.dumps(row) + "\n" for row in CAPITALS))
    (tmp_path / "my_tasks" / "capitals.yaml").write_text(USER_TASK.format(data=tmp_path / "capitals.jsonl"))
    capsys.readouterr()
    args = ["--run_dir", "runs/tiny", "--include_path", "my_tasks", "--limit", "6"]
    code = run_cli(
        monkeypatch, "evaluate", "--ckpt_path", "last", "--tasks", "python_docs_mc,capitals", *args
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    # Into the run the checkpoint belongs to, not a new version folder.
    assert sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir()) == ["version_0"]
    (written,) = (tmp_path / "runs" / "tiny" / "version_0" / "evaluate").glob("results_*.json")
    assert f"Wrote the results to {written.relative_to(tmp_path)}" in out
    results = json.loads(written.read_text())
    assert results["lm_lightning"]["ckpt_path"] == "runs/tiny/version_0/checkpoints/last.ckpt"
    assert results["n-samples"]["python_docs_mc"] == {"original": 170, "effective": 6}
    assert results["n-samples"]["capitals"] == {"original": 3, "effective": 3}
    local = ("acc", "acc_norm", "acc_mutual_info")
    for task, metrics in (("python_docs_mc", local), ("capitals", ("acc",))):
        assert all(0 <= results["results"][task][f"{metric},none"] <= 1 for metric in metrics)
    # The harness's own table, printed: a row per task and metric, with the values of the JSON.
    header, _, *rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("|")]
    columns = [cell.strip() for cell in header]
    assert columns[:5] == ["Tasks", "Version", "Filter", "n-shot", "Metric"] and "Value" in columns
    printed, task = {}, None
    for row in rows:
        cells = dict(zip(columns, (cell.strip() for cell in row), strict=False))
        task = cells["Tasks"] or task
        printed[task, cells["Metric"]] = float(cells["Value"])
    assert set(printed) == {("python_docs_mc", metric) for metric in local} | {("capitals", "acc")}
    for (task, metric), value in printed.items():
        assert value == pytest.approx(results["results"][task][f"{metric},none"], abs=1e-4)


def test_harness_loglikelihood_is_our_completion_nll(bpe_tokenizer):
    """The harness's log-likelihood of a completion given its prompt is minus our completion-only NLL.

    Compared on the same token ids and the same targets. The harness moves trailing whitespace of the context
    into the continuation, encodes context + continuation whole and takes the context's tokens off the front
    (lm_eval TemplateLM._encode_pair); the corpus's prompts end with "\\n". So each pair is given as the
    harness splits it: the question without its "\\n", and "\\n" + the answer (the local task's context and
    choice). Our side is the prompt-completion encoding of fit (prompt tokens, completion tokens, EOS; labels
    -100 on the prompt) without the EOS, which the harness does not score; the assertion that it gives the
    same ids as the whole string is what makes the two comparable.
    """
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    torch.manual_seed(0)
    eos = bpe_tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(bpe_tokenizer), n_positions=256, n_embd=64, n_layer=2, n_head=2, bos_token_id=eos,
        eos_token_id=eos,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    qa = python_docs_qa()
    pairs = [(p.rstrip(), "\n" + c) for p, c in zip(qa["prompt"][:8], qa["completion"][:8], strict=True)]
    lm = HFLM(pretrained=model, tokenizer=bpe_tokenizer, batch_size=3)  # batches of several lengths, padded
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    harness = [logprob for logprob, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    for (question, answer), logprob in zip(pairs, harness, strict=True):
        ids, labels = encode_prompt_completion(bpe_tokenizer, question, answer, True, "test")
        ids, labels = ids[:-1], labels[:-1]  # without the EOS
        assert ids == bpe_tokenizer(question + answer).input_ids
        with torch.no_grad():
            nll, n_targets = causal_lm_nll(model, torch.tensor([ids]), torch.tensor([labels]))
        assert int(n_targets) == len(bpe_tokenizer(answer).input_ids) > 10
        # Two float32 sums of a few hundred nats: equal to 1e-5 per target token (the float32 rounding).
        assert abs(logprob + nll.item()) / int(n_targets) < 1e-5, (logprob, -nll.item())
    # The harness gives the corpus's own pair (prompt with "\n") the very same score: it moves the "\n".
    original = Instance("loglikelihood", {}, (qa["prompt"][0], qa["completion"][0]), 0)
    assert lm.loglikelihood([original], disable_tqdm=True)[0][0] == pytest.approx(harness[0], abs=1e-4)


@pytest.fixture
def lora_checkpoint(tmp_path, bpe_tokenizer, doc_texts) -> tuple[Path, str]:
    """A LoRA checkpoint trained 4 steps on a tiny pretrained GPT-2 folder; (checkpoint, base folder)."""
    torch.manual_seed(0)
    eos = bpe_tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(bpe_tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2, bos_token_id=eos,
        eos_token_id=eos,
    )  # fmt: skip
    base = tmp_path / "base"
    GPT2LMHeadModel(config).save_pretrained(base)
    bpe_tokenizer.save_pretrained(base)
    L.seed_everything(3)
    module = CausalLMModule(model_name_or_path=str(base), lora={"r": 4, "alpha": 8}, learning_rate=1e-2)
    texts = DatasetDict({"train": Dataset.from_dict({"text": doc_texts[:60]})})
    data = CausalLMDataModule(dataset=texts, block_size=32, batch_size=4, cache_dir=str(tmp_path / "cache"))
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpts", filename="lora", monitor=None)
    trainer = quiet_trainer(
        tmp_path, max_steps=4, limit_val_batches=0, callbacks=[checkpoints], enable_checkpointing=True
    )
    trainer.fit(module, data)
    return tmp_path / "ckpts" / "lora.ckpt", str(base)


def test_lora_checkpoint_evaluates_as_its_merged_export(tmp_path, monkeypatch, lora_checkpoint):
    ckpt, base = lora_checkpoint
    monkeypatch.chdir(tmp_path)
    assert run_cli(monkeypatch, "export", "--ckpt_path", str(ckpt), "--output_dir", "merged") == 0
    common = ["--tasks", "python_docs_mc", "--limit", "4", "--log_samples", "true"]
    assert (
        run_cli(monkeypatch, "evaluate", "--ckpt_path", str(ckpt), *common, "--output_path", "lora.json") == 0
    )
    for name, folder in (("merged", "merged"), ("base", base)):
        args = ["--model.model_name_or_path", folder, "--output_path", f"{name}.json"]
        assert run_cli(monkeypatch, "evaluate", *common, *args) == 0
    lora, merged, plain = (_samples_loglikelihoods(tmp_path / f"{n}.json", "python_docs_mc") for n in
                           ("lora", "merged", "base"))  # fmt: skip
    assert len(lora) == 32  # 4 documents of 4 choices, given the question and alone (acc_mutual_info)
    # The adapters on their base in memory score every choice as the merged weights do ...
    assert lora == pytest.approx(merged, rel=1e-5)
    # ... and they count: the base model alone scores them otherwise.
    assert max(abs(a - b) for a, b in zip(lora, plain, strict=True)) > 1e-3
    for name in ("lora", "merged"):
        assert (
            json.loads((tmp_path / f"{name}.json").read_text())["results"]["python_docs_mc"]["acc,none"]
            == (json.loads((tmp_path / "lora.json").read_text())["results"]["python_docs_mc"]["acc,none"])
        )


def _fit_with(
    tmp_path: Path, bpe_tokenizer_path: str, doc_texts: list[str], callbacks: list
) -> CausalLMModule:
    L.seed_everything(5)
    module = CausalLMModule(
        model_config={"n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 256}, learning_rate=1e-3
    )
    texts = DatasetDict({"train": Dataset.from_dict({"text": doc_texts[:40]})})
    data = CausalLMDataModule(
        dataset=texts,
        tokenizer=bpe_tokenizer_path,
        block_size=32,
        batch_size=4,
        cache_dir=str(tmp_path / "c"),
    )
    logger = CSVLogger(tmp_path, name="csv")
    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_train_batches=3, logger=logger, callbacks=callbacks)
    trainer.fit(module, data)
    return module


def test_harness_callback_logs_task_metrics_and_leaves_training_untouched(
    tmp_path, capsys, bpe_tokenizer_path, doc_texts
):
    callback = HarnessEvalCallback(tasks="python_docs_mc", every_n_epochs=1, limit=3)
    evaluated = _fit_with(tmp_path / "a", bpe_tokenizer_path, doc_texts, [callback])
    plain = _fit_with(tmp_path / "b", bpe_tokenizer_path, doc_texts, [])
    # The harness seeds the global generators and puts the model in eval mode: both are given back, so the
    # training (dropout on) goes on exactly as without the callback.
    for (name, a), b in zip(evaluated.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with open(tmp_path / "a" / "csv" / "version_0" / "metrics.csv") as file:
        rows = [r for r in csv.DictReader(file) if r.get("eval/python_docs_mc/acc")]
    assert [int(r["step"]) for r in rows] == [3, 6]  # the end of each of the 2 epochs of 3 steps
    assert all(0 <= float(r["eval/python_docs_mc/acc"]) <= 1 for r in rows)
    assert all(0 <= float(r["eval/python_docs_mc/acc_norm"]) <= 1 for r in rows)
    assert callback.results["n-samples"]["python_docs_mc"]["effective"] == 3
    assert "Harness tasks at epoch 1, step 6:" in capsys.readouterr().out


@pytest.mark.parametrize("callback_class", [HarnessEvalCallback, TextGenerationCallback])
def test_callbacks_that_run_on_rank_zero_refuse_sharded_parameters(callback_class):
    callback = (
        callback_class(["python_docs_mc"]) if callback_class is HarnessEvalCallback else callback_class(["x"])
    )
    trainer = SimpleNamespace(strategy=ModelParallelStrategy(), world_size=2)
    with pytest.raises(ValueError, match="ModelParallelStrategy shards across 2 processes"):
        callback.setup(trainer, None, "fit")


def test_evaluate_errors_exit_2_before_anything_is_written(tmp_path, monkeypatch, capsys):
    import datasets

    monkeypatch.chdir(tmp_path)
    (tmp_path / "hub_tasks").mkdir()
    (tmp_path / "hub_tasks" / "on_hub.yaml").write_text(
        "task: on_hub\ndataset_path: some-org/some-data\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\ndoc_to_choice: "{{c}}"\ndoc_to_target: 0\n'
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read at import: as a user's shell sets it
    missing = str(tmp_path / "no-such-model")  # never loaded: the task fails first
    cases = [
        (["--tasks", "python_docs_mc"], "evaluate needs a model: --ckpt_path last"),
        (["--ckpt_path", "last", "--tasks", "python_docs_mc"], "no last*.ckpt under runs/lm_lightning"),
        (["--model.model_name_or_path", missing, "--tasks", " , "], "names no task"),
        (["--model.model_name_or_path", missing, "--tasks", "python_docs_mc", "--limit", "0"], "--limit=0"),
        (
            ["--model.model_name_or_path", missing, "--tasks", "on_hub", "--include_path", "hub_tasks"],
            "Couldn't reach 'some-org/some-data' on the Hub",
        ),
    ]
    for args, expected in cases:
        assert run_cli(monkeypatch, "evaluate", *args) == 2, args
        err = capsys.readouterr().err
        assert expected in err, err
    assert "(HF_HUB_OFFLINE is set)" in err and "dataset_path: json" in err and "--include_path" in err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # not installed
    assert run_cli(monkeypatch, "evaluate", "--tasks", "python_docs_mc", "--ckpt_path", "last") == 2
    assert 'pip install -e ".[eval]"' in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub_tasks"]  # nothing written
