"""Fine-tuning formats: detection, exact labels, packing that keeps examples apart, document masking, strided
perplexity, chat prompts for predict."""

from __future__ import annotations

import json
import logging
import math

import lightning as L
import pytest
import torch
from conftest import GPT2_TOKENIZER, needs_shared_data, quiet_trainer
from datasets import Dataset, DatasetDict
from tokenizers import processors
from transformers import GPT2Config, GPT2LMHeadModel

from lm_lightning import CausalLMDataModule, CausalLMModule, causal_lm_nll, load_tokenizer
from lm_lightning.data.formats import IGNORE_INDEX, detect_format, encode_chat, encode_prompt_completion
from lm_lightning.data.strided import strided_windows

CHATML_MARKED = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATS = [
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "What does the for statement do?"},
        {"role": "assistant", "content": "It iterates over a sequence."},
        {"role": "user", "content": "And while?"},
        {"role": "assistant", "content": "\n\n    It loops while a condition holds.\n"},
    ],
    [{"role": "assistant", "content": "I start."}, {"role": "user", "content": "Ok"}],
    [{"role": "user", "content": "Ünïcödé?"}, {"role": "assistant", "content": "日本語 ✓ 🐍"}],
]


def chat_tokenizer(tokenizer):
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def test_format_detection_as_trl_and_override():
    assert detect_format(["messages", "id"], "text", "auto", "train") == "chat"
    assert detect_format(["prompt", "completion"], "text", "auto", "train") == "prompt_completion"
    assert detect_format(["text", "prompt_id"], "text", "auto", "train") == "text"
    assert detect_format(["body"], "body", "auto", "train") == "text"
    assert detect_format(["prompt", "completion", "text"], "text", "text", "train") == "text"  # override
    with pytest.raises(ValueError, match="has a 'prompt' column but no 'completion' column"):
        detect_format(["prompt", "text"], "text", "auto", "train")
    with pytest.raises(ValueError, match=r"format='chat' needs the column\(s\) \['messages'\]"):
        detect_format(["text"], "text", "chat", "train")


def test_prompt_completion_ids_and_labels_exact(bpe_tokenizer):
    tok, eos = bpe_tokenizer, bpe_tokenizer.eos_token_id
    prompt, completion = "Explain the for statement.\n", "It iterates."
    p = tok(prompt).input_ids
    c = tok(completion, add_special_tokens=False).input_ids
    ids, labels = encode_prompt_completion(tok, prompt, completion, True, "row 0")
    assert ids == p + c + [eos]
    assert labels == [IGNORE_INDEX] * len(p) + c + [eos]
    assert encode_prompt_completion(tok, prompt, completion, False, "row 0") == (ids, ids)
    # A completion that already ends with EOS gets no second one.
    assert encode_prompt_completion(tok, prompt, completion + tok.eos_token, True, "r")[0] == ids
    # A tokenizer that adds BOS: one BOS, before the prompt only (tokenized apart, as trl does).
    tok.add_special_tokens({"bos_token": "<s>"})
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    ids, labels = encode_prompt_completion(tok, prompt, completion, True, "row 0")
    assert ids == [bos] + p + c + [eos] and ids.count(bos) == 1
    assert labels == [IGNORE_INDEX] * (len(p) + 1) + c + [eos]


def test_chat_labels_cover_assistant_turns_with_and_without_generation_markers(bpe_tokenizer):
    tok = chat_tokenizer(bpe_tokenizer)
    for chat in CHATS:
        marked = encode_chat(tok, chat, CHATML_MARKED, True, "row 0")
        plain = encode_chat(tok, chat, CHATML, True, "row 0")
        assert marked == plain
        ids, labels = plain
        assert ids == tok(tok.apply_chat_template(chat, chat_template=CHATML, tokenize=False)).input_ids
        trained = tok.decode([t for t in labels if t != IGNORE_INDEX])
        assert trained == "".join(m["content"] + "<|im_end|>" for m in chat if m["role"] == "assistant")
        assert encode_chat(tok, chat, CHATML, False, "row 0") == (ids, ids)


def tiny_module(tokenizer_path, family="gpt2", attn="sdpa", chunk=128, vocab=None):
    config = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 256}
    if family == "llama":
        config = {
            "model_type": "llama",
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "max_position_embeddings": 256,
        }
    if vocab:
        config["vocab_size"] = vocab
    torch.manual_seed(0)
    module = CausalLMModule(
        model_config=config, tokenizer=tokenizer_path, attn_implementation=attn, loss_chunk_size=chunk
    )
    module.configure_model()
    module.model.eval()
    return module


def split_nll(module, loader):
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            nll, n, _ = module._nll(batch)
            total, count = total + nll.item(), count + int(n)
    return total, count


def qa_chats() -> DatasetDict:
    """Two-turn chats from the python-docs-qa pairs."""
    from lm_lightning.data.corpus import python_docs_qa

    qa = python_docs_qa()
    pairs = list(zip(qa["prompt"], qa["completion"], strict=True))
    chats = [
        [
            {"role": "user", "content": p},
            {"role": "assistant", "content": c[:60]},
            {"role": "user", "content": "And then?"},
            {"role": "assistant", "content": pairs[(i + 1) % len(pairs)][1][:40]},
        ]
        for i, (p, c) in enumerate(pairs)
    ]
    return DatasetDict(train=Dataset.from_dict({"messages": chats}))


@pytest.mark.parametrize(
    "family, attn, chunk, completion_only, chat",
    [
        ("gpt2", "sdpa", 128, True, False),
        ("gpt2", "eager", None, False, False),
        ("llama", "sdpa", None, False, False),
        ("llama", "eager", 128, True, True),
    ],
)
def test_packed_unpacked_and_alone_give_the_same_loss(
    tmp_path, bpe_tokenizer_path, family, attn, chunk, completion_only, chat, caplog
):
    """Through the data module's loaders and the module's loss: packed == unpacked == each example alone.

    Without completion_only_loss every token is a target, the first of each packed example included
    unless it is masked."""
    data = dict(tokenizer=bpe_tokenizer_path, corpus="python-docs-qa", block_size=96, batch_size=8)
    if chat:
        template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        (tmp_path / "chat.jinja").write_text(
            template + "{% if add_generation_prompt %}assistant: {% endif %}"
        )
        data.update(
            corpus=None, dataset=qa_chats(), chat_template=str(tmp_path / "chat.jinja"), block_size=256
        )
    data["completion_only_loss"] = completion_only
    data["cache_dir"] = str(tmp_path / "cache")
    module = tiny_module(bpe_tokenizer_path, family, attn, chunk)
    results, unpacked_rows = {}, None
    with caplog.at_level(logging.INFO, logger="lm_lightning"):
        for packing in (False, True):
            dm = CausalLMDataModule(**data, packing=packing, validation_split_percentage=20)
            dm.prepare_data()
            dm.setup()
            results[packing] = split_nll(module, dm.val_dataloader())
            rows = dm.datasets["validation"]
            if packing:
                assert len(rows) < len(unpacked_rows)  # several examples share a row
                batch = next(iter(dm.val_dataloader()))
                # What the loss does for flash_attention_2 (which finds packed examples only in a batch of
                # one row): the rows joined into one give the same loss.
                joined = {k: v.reshape(1, -1) for k, v in batch.items() if isinstance(v, torch.Tensor)}
                with torch.no_grad():
                    assert module._nll(joined)[0].item() == pytest.approx(
                        module._nll(batch)[0].item(), rel=1e-5
                    )
            else:
                unpacked_rows = rows
    # Each example alone: the unpacked rows, one at a time, without padding.
    alone, n_alone = 0.0, 0
    with torch.no_grad():
        for row in unpacked_rows:
            nll, n = causal_lm_nll(
                module.model, row["input_ids"][None], row["labels"][None], chunk_size=chunk
            )
            alone, n_alone = alone + nll.item(), n_alone + int(n)
    assert results[False][1] == results[True][1] == n_alone
    for total, _ in results.values():
        assert total == pytest.approx(alone, rel=1e-5)
        assert math.exp(total / n_alone) == pytest.approx(math.exp(alone / n_alone), rel=1e-5)
    # The truncation is logged with its counts (here: every split, for each packing).
    assert any("longer than block_size truncated" in r.getMessage() for r in caplog.records)


def test_validate_perplexity_packed_equals_unpacked(tmp_path, bpe_tokenizer_path):
    """The logged val/perplexity, through Trainer.validate, does not depend on packing."""
    out = {}
    for packing in (False, True):
        dm = CausalLMDataModule(
            tokenizer=bpe_tokenizer_path,
            corpus="python-docs-qa",
            block_size=96,
            batch_size=4,
            packing=packing,
            cache_dir=str(tmp_path / "cache"),
        )
        module = tiny_module(bpe_tokenizer_path)
        out[packing] = quiet_trainer(tmp_path).validate(module, dm, verbose=False)[0]["val/perplexity"]
    assert out[True] == pytest.approx(out[False], rel=1e-5)


def test_truncated_and_dropped_examples_are_counted_and_logged(tmp_path, bpe_tokenizer_path, caplog):
    rows = {
        "prompt": ["Short question?\n", "word " * 40, "Another one.\n", "x"],
        "completion": ["Short answer.", "fits after the long prompt? no", "word " * 40, "y"],
    }
    dm = CausalLMDataModule(
        tokenizer=bpe_tokenizer_path,
        dataset=DatasetDict(train=Dataset.from_dict(rows), validation=Dataset.from_dict(rows)),
        block_size=24,
        packing=True,
        cache_dir=str(tmp_path / "cache"),
    )
    with caplog.at_level(logging.INFO, logger="lm_lightning"):
        dm.prepare_data()
    dm.setup()
    # Row 1's prompt alone is longer than 24 tokens: no target is left, it is dropped; row 2 is truncated.
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train:")]
    assert len(messages) == 1 and messages[0].startswith("train: 4 examples -> 2 rows of at most 24 tokens")
    assert messages[0].endswith(
        "2 longer than block_size truncated to their first 24 tokens, 1 dropped (no target token among them)"
    )
    manifest = json.loads((dm.cache_path / "manifest.json").read_text())
    counts = manifest["splits"]["train"]
    assert counts["num_truncated"] == 2 and counts["num_dropped"] == 1
    rows = list(dm.datasets["train"])
    assert sorted(len(r["input_ids"]) for r in rows)[-1] == 24  # the truncated example fills a row
    assert sum(r["position_ids"].tolist().count(0) for r in rows) == 3  # three examples kept


def test_document_masking_equals_each_document_alone(tmp_path, bpe_tokenizer_path, doc_texts):
    texts = Dataset.from_dict({"text": doc_texts[100:160]})
    dm = CausalLMDataModule(
        tokenizer=bpe_tokenizer_path,
        dataset=DatasetDict(train=texts, validation=texts),
        block_size=96,
        batch_size=8,
        eos_between_texts=True,
        document_masking=True,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.prepare_data()
    dm.setup()
    module = tiny_module(bpe_tokenizer_path, "llama", "sdpa")
    masked, n_masked = split_nll(module, dm.val_dataloader())
    eos = dm.tokenizer.eos_token_id
    alone, n_alone, plain_count = 0.0, 0, 0
    with torch.no_grad():
        for block in dm.datasets["validation"]["input_ids"]:
            plain_count += len(block) - 1
            starts = [0] + [i + 1 for i in range(len(block) - 1) if block[i] == eos] + [len(block)]
            for a, b in zip(starts[:-1], starts[1:], strict=False):
                nll, n = causal_lm_nll(module.model, block[a:b][None].long(), chunk_size=None)
                alone, n_alone = alone + nll.item(), n_alone + int(n)
    assert n_masked == n_alone < plain_count  # each document's first token is no target
    assert masked == pytest.approx(alone, rel=1e-5)


def reference_strided(model, stream, window, stride):
    """The sliding-window method, token by token: windows ``stream[k * stride : k * stride + window]``, and
    token t (t >= 1) predicted in the first window holding both t - 1 and t, from the window's tokens before
    it. With ``stride == window`` a window's first token has no such window: it is not scored. Returns the
    summed NLL and the number of tokens scored."""
    n = len(stream)
    by_length, next_logprob = {}, {}  # next_logprob[b][i]: log p(stream[b + i + 1] | stream[b : b + i + 1])
    for b in range(0, n, stride):  # one window at a time would be slow: batched by length
        by_length.setdefault(min(window, n - b), []).append(b)
    with torch.no_grad():
        for length, starts in by_length.items():
            windows = torch.stack([stream[b : b + length] for b in starts])
            logprobs = torch.log_softmax(model(windows).logits.double(), -1)[:, :-1]
            targets = logprobs.gather(2, windows[:, 1:, None]).squeeze(2)
            next_logprob.update(zip(starts, targets, strict=True))
    nll, count = 0.0, 0
    for t in range(1, n):
        b = max(0, (t - window) // stride + 1) * stride  # the first window start after t - window
        if not b <= t - 1:  # t opens its window (stride == window): no window predicts it
            continue
        nll -= next_logprob[b][t - 1 - b].item()
        count += 1
    return nll, count


def test_strided_perplexity_scores_every_token_of_the_split_once(tmp_path, bpe_tokenizer_path, doc_texts):
    """Splits of 1.75 and 286.3 blocks of 16: every token but the first is scored once, tail included, against
    a per-token reference on the texts' own tokens; num_proc 2 gives the same stream and number."""
    tokenizer = load_tokenizer(bpe_tokenizer_path)
    lengths = [len(ids) for ids in tokenizer(doc_texts)["input_ids"]]
    short = next(i for i, n in enumerate(lengths) if n == 28)  # 1.75 blocks
    test_texts, total = [], 0
    for text, n in zip(doc_texts, lengths, strict=True):
        if total < 286 * 16 + 5 and total + n < 287 * 16:  # 286 blocks, and a tail of 5 to 15 tokens
            test_texts.append(text)
            total += n
    splits = {"validation": [doc_texts[short]], "test": test_texts}
    raw = DatasetDict(
        train=Dataset.from_dict({"text": doc_texts[:40]}),
        **{split: Dataset.from_dict({"text": texts}) for split, texts in splits.items()},
    )
    data = dict(tokenizer=bpe_tokenizer_path, dataset=raw, block_size=16, eval_batch_size=64)
    module = tiny_module(bpe_tokenizer_path)
    streams = {split: torch.tensor(sum(tokenizer(texts)["input_ids"], [])) for split, texts in splits.items()}
    assert len(streams["validation"]) == 28
    assert len(streams["test"]) // 16 == 286 and len(streams["test"]) % 16 >= 5
    results = {}
    for num_proc, strides in ((1, (4, 5, 8, 16)), (2, (5,))):
        for stride in strides:
            dm = CausalLMDataModule(**data, eval_stride=stride, num_proc=num_proc, cache_dir=str(tmp_path))
            dm.prepare_data()
            dm.setup()
            for split, stream in streams.items():
                if split == "test" and stride in (4, 8):  # the long split: 5 (not dividing 16) and 16
                    continue
                loader = dm.val_dataloader() if split == "validation" else dm.test_dataloader()
                assert torch.equal(loader.dataset.tokens.long(), stream)  # the whole split, in order
                results[num_proc, stride, split] = nll, n = split_nll(module, loader)
                if num_proc == 1:
                    expected_nll, expected_n = reference_strided(module.model, stream, 16, stride)
                    windows = -(-len(stream) // stride)  # with stride 16, each window's first token unscored
                    assert n == expected_n == (len(stream) - 1 if stride < 16 else len(stream) - windows)
                    assert nll == pytest.approx(expected_nll, rel=1e-5)
            if stride == 5 and num_proc == 1:  # what validate logs
                logged = quiet_trainer(tmp_path).validate(module, dm, verbose=False)[0]["val/perplexity"]
                nll, n = results[1, 5, "validation"]
                assert logged == pytest.approx(math.exp(nll / n), rel=1e-5)
    for split in streams:
        assert results[2, 5, split] == pytest.approx(results[1, 5, split], rel=1e-6)
    assert strided_windows(10, 4, 3) == [(0, 4, 0), (3, 7, 1), (6, 10, 1)]
    assert strided_windows(3, 16, 5) == [(0, 3, 0)]  # shorter than a window: one window


def test_chat_predict_stops_at_the_end_of_turn(tmp_path, bpe_tokenizer):
    tok = chat_tokenizer(bpe_tokenizer)
    tok.chat_template = CHATML
    tok.save_pretrained(tmp_path / "tok")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=1, n_head=2)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # every position's hidden state is <|im_end|>'s embedding: it is always predicted
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(model.transformer.wte.weight[im_end] * 50)
    model.save_pretrained(tmp_path / "model")
    chats = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A tuple?"}]},
        {"messages": [{"role": "user", "content": "Hi"}]},
    ]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    (tmp_path / "plain.txt").write_text("A tuple?\n")
    outputs = {}
    for name in ("chats.jsonl", "plain.txt"):
        module = CausalLMModule(
            model_name_or_path=str(tmp_path / "model"),
            tokenizer=str(tmp_path / "tok"),
            predict_decodings=[{"preset": "greedy", "max_new_tokens": 5}],
        )
        dm = CausalLMDataModule(tokenizer=str(tmp_path / "tok"), prompts_file=str(tmp_path / name))
        outputs[name] = [r for batch in quiet_trainer(tmp_path).predict(module, dm) for r in batch]
    chat_out = outputs["chats.jsonl"]
    assert [r["prompt"] for r in chat_out] == [
        tok.apply_chat_template(c["messages"], tokenize=False, add_generation_prompt=True) for c in chats
    ]
    assert chat_out[1]["prompt"] == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert [(r["num_new_tokens"], r["text"]) for r in chat_out] == [(1, ""), (1, "")]  # stopped at <|im_end|>
    assert outputs["plain.txt"][0]["num_new_tokens"] == 5  # a plain prompt does not stop there


@needs_shared_data
def test_chat_predict_stops_at_an_end_of_turn_of_several_tokens(tmp_path):
    """ChatML on the GPT-2 tokenizer: <|im_end|> is 7 plain tokens, not a special one. A model trained to end
    its answer with it stops there in predict (a stop string), and the text leaves it out."""
    tok = load_tokenizer(GPT2_TOKENIZER)
    tok.chat_template = CHATML
    assert len(tok("<|im_end|>").input_ids) == 7
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    ids, labels = encode_chat(tok, chat, CHATML, True, "row 0")
    ids, labels = torch.tensor([ids]), torch.tensor([labels])
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):  # learns the answer and its <|im_end|> (the labels' end) by heart
        nll, n = causal_lm_nll(model, ids, labels)
        (nll / n).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": chat[:1]}) + "\n")
    module = CausalLMModule(
        model_name_or_path=str(tmp_path / "model"),
        predict_decodings=[{"preset": "greedy", "max_new_tokens": 20}],
    )
    dm = CausalLMDataModule(tokenizer=tok, prompts_file=str(tmp_path / "chat.jsonl"))
    [[out]] = quiet_trainer(tmp_path).predict(module, dm)
    answer = tok("Hello there<|im_end|>", add_special_tokens=False).input_ids
    assert (out["text"], out["num_new_tokens"]) == ("Hello there", len(answer))  # not 20 tokens


def test_sft_recipe_lowers_the_completion_perplexity(tmp_path, bpe_tokenizer_path, monkeypatch):
    """The shipped recipe, with the quickstart's export swapped for a tiny GPT-2 folder."""
    from pathlib import Path

    from lm_lightning.cli import cli_main

    monkeypatch.chdir(tmp_path)
    module = tiny_module(bpe_tokenizer_path)
    module.export_hf(tmp_path / "hf_model")
    config = Path(__file__).parents[1] / "configs" / "sft-python-docs.yaml"
    cli = cli_main(
        ["--config", str(config), "--model.model_name_or_path", "hf_model", "--data.tokenizer", "hf_model",
         "--data.block_size", "128", "--data.cache_dir", "cache", "--trainer.accelerator", "cpu",
         "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "6", "--model.export_dir", "null"],
        run=False,
    )  # fmt: skip
    perplexities = []

    class Record(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                perplexities.append(float(trainer.callback_metrics["val/perplexity"]))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            assert "position_ids" in batch  # packed
            assert (batch["labels"] == IGNORE_INDEX).any()  # the prompts are masked

    cli.trainer.callbacks.append(Record())
    # Before: the same weights in another module (a module validated in inference mode is not trained after).
    start = CausalLMModule(model_name_or_path="hf_model", tokenizer="hf_model")
    before = quiet_trainer(tmp_path).validate(start, cli.datamodule, verbose=False)[0]["val/perplexity"]
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.datamodule.data_format == "prompt_completion"
    assert len(perplexities) == 3
    assert before > perplexities[0] > perplexities[1] > perplexities[2]
