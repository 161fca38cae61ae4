"""Streaming: blocks packed on the fly, dealt to ranks and workers exactly, resumable mid-pass."""

from __future__ import annotations

from collections import Counter

import pandas as pd
import pytest
import torch
from conftest import quiet_trainer
from datasets import Dataset, DatasetDict
from torchdata.stateful_dataloader import StatefulDataLoader

from lm_lightning.data.datamodule import CausalLMDataModule
from lm_lightning.data.sources import TextSource
from lm_lightning.data.streaming import StreamingBlocks
from lm_lightning.data.tokenizer import load_tokenizer
from lm_lightning.errors import RunError

BLOCK = 24


@pytest.fixture(scope="module")
def shard_files(tmp_path_factory, doc_texts) -> list[str]:
    """Five Parquet files of uneven length: five shards."""
    folder = tmp_path_factory.mktemp("shards")
    files = []
    for i, (start, stop) in enumerate([(0, 40), (40, 120), (120, 150), (150, 230), (230, 260)]):
        path = folder / f"part-{i}.parquet"
        pd.DataFrame({"text": doc_texts[start:stop]}).to_parquet(path, row_group_size=16)
        files.append(str(path))
    return files


def _blocks(dataset_or_loader) -> list[tuple[int, ...]]:
    out = []
    for item in dataset_or_loader:
        ids = item["input_ids"]
        out += [tuple(row) for row in (ids.tolist() if ids.dim() == 2 else [ids.tolist()])]
    return out


def _stream(files, tokenizer, **kwargs) -> StreamingBlocks:
    texts = TextSource(data_files={"train": str(files[0]).replace("part-0", "part-*")}).stream_train()
    kwargs.setdefault("passes", 1)
    return StreamingBlocks(texts, tokenizer, block_size=BLOCK, map_batch_size=7, **kwargs)


def test_each_shard_is_packed_on_its_own_and_drops_at_most_one_partial_block(shard_files, bpe_tokenizer):
    expected = []
    for file in shard_files:
        ids = [t for text in pd.read_parquet(file)["text"] for t in bpe_tokenizer(text)["input_ids"]]
        expected += [tuple(ids[i : i + BLOCK]) for i in range(0, len(ids) // BLOCK * BLOCK, BLOCK)]
    got = _blocks(_stream(shard_files, bpe_tokenizer))
    assert _stream(shard_files, bpe_tokenizer).num_shards == 5
    assert Counter(got) == Counter(expected) and len(got) == len(expected) > 100


def test_two_ranks_times_two_workers_see_exactly_the_blocks_of_one_process(
    shard_files, bpe_tokenizer, monkeypatch
):
    # As CausalLMDataModule sets it: the parent's Rust thread pool is used before the workers fork
    # (they must not use it: regression test for a hang in the full suite).
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    one_process = _blocks(_stream(shard_files, bpe_tokenizer))
    per_rank = []
    for rank in range(2):
        stream = _stream(shard_files, bpe_tokenizer, rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2)
        per_rank.append(_blocks(loader))
    together = per_rank[0] + per_rank[1]
    assert Counter(together) == Counter(one_process)  # none read twice, none skipped
    assert per_rank[0] and per_rank[1]
    # The shards really were dealt: rank 0 reads 3 of the 5 files, rank 1 the other 2.
    ranks = [_stream(shard_files, bpe_tokenizer, rank=r, world_size=2) for r in range(2)]
    dealt = [set(ranks[r].shards_of(0, w, 2)) for r in range(2) for w in range(2)]
    assert sorted(len(d) for d in dealt) == [1, 1, 1, 2] and set().union(*dealt) == set(range(5))


def test_passes_repeat_with_a_new_shard_order(shard_files, bpe_tokenizer):
    stream = _stream(shard_files, bpe_tokenizer, passes=2, seed=3)
    both = _blocks(stream)
    half = len(both) // 2
    assert Counter(both[:half]) == Counter(both[half:])  # each pass: every block once
    assert stream.shards_of(0) != stream.shards_of(1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_pass_continues_with_the_next_block(shard_files, bpe_tokenizer, num_workers):
    def loader():
        stream = _stream(shard_files, bpe_tokenizer, passes=2)
        return StatefulDataLoader(stream, batch_size=3, num_workers=num_workers)

    uninterrupted = _blocks(loader())
    first = loader()
    it = iter(first)
    head = _blocks(next(it) for _ in range(23))  # mid-shard and mid-batch of texts
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    assert head + _blocks(resumed) == uninterrupted


def test_streaming_data_module_validation_is_cached_and_train_is_streamed(
    tmp_path, shard_files, bpe_tokenizer_path
):
    valid = tmp_path / "valid.parquet"
    pd.read_parquet(shard_files[1]).to_parquet(valid)
    dm = CausalLMDataModule(
        tokenizer=bpe_tokenizer_path,
        data_files={"train": shard_files[0].replace("part-0", "part-*"), "validation": str(valid)},
        block_size=BLOCK,
        batch_size=4,
        streaming=True,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.prepare_data()
    dm.setup("fit")
    assert set(dm.datasets) == {"validation"}  # the train split was not loaded nor cached
    loader = dm.train_dataloader()
    assert isinstance(loader, StatefulDataLoader)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, BLOCK) and batch["input_ids"].dtype == torch.long
    tokenizer = load_tokenizer(bpe_tokenizer_path)
    assert tokenizer.decode(batch["input_ids"][0]) in "".join(
        t for f in shard_files for t in pd.read_parquet(f)["text"]
    )


def test_streaming_settings_that_cannot_work_fail_with_the_setting(tmp_path, shard_files, bpe_tokenizer_path):
    dsd = DatasetDict({"train": Dataset.from_dict({"text": ["a b"] * 10})})
    with pytest.raises(ValueError, match="streaming=True reads a hub dataset"):
        CausalLMDataModule(tokenizer=bpe_tokenizer_path, dataset=dsd, streaming=True)
    dm = CausalLMDataModule(
        tokenizer=bpe_tokenizer_path, data_files=shard_files[0], streaming=True, cache_dir=str(tmp_path)
    )
    with pytest.raises(ValueError, match="needs a validation split"):
        dm.prepare_data()
    texts = TextSource(data_files={"train": shard_files[0]}).stream_train()
    with pytest.raises(ValueError, match=r"1 shard\(s\) \(files\) for 2 processes"):
        StreamingBlocks(texts, load_tokenizer(bpe_tokenizer_path), rank=0, world_size=2)


def _streaming_fit(
    tmp_path,
    shard_files,
    tokenizer_path,
    max_steps,
    ckpt_path=None,
    callbacks=(),
    scheduler="constant",
    **limits,
):
    import lightning as L

    from lm_lightning import CausalLMModule

    tmp_path.mkdir(parents=True, exist_ok=True)
    valid = tmp_path / "valid.parquet"
    pd.read_parquet(shard_files[1]).to_parquet(valid)
    data = CausalLMDataModule(
        tokenizer=tokenizer_path,
        data_files={"train": shard_files[0].replace("part-0", "part-*"), "validation": str(valid)},
        block_size=BLOCK,
        batch_size=4,
        map_batch_size=7,
        streaming=True,
        cache_dir=str(tmp_path / "cache"),
    )
    no_dropout = {"n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": BLOCK, "resid_pdrop": 0.0}
    no_dropout.update(embd_pdrop=0.0, attn_pdrop=0.0)
    model = CausalLMModule(model_config=no_dropout, tokenizer=tokenizer_path, lr_scheduler=scheduler)
    trainer = quiet_trainer(
        tmp_path,
        max_steps=max_steps,
        limit_val_batches=0,
        enable_checkpointing=bool(callbacks),
        callbacks=list(callbacks),
        **limits,
    )
    L.seed_everything(0)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model


def test_streaming_fit_resumed_mid_pass_ends_with_the_uninterrupted_weights(
    tmp_path, shard_files, bpe_tokenizer_path
):
    from lightning.pytorch.callbacks import ModelCheckpoint

    uninterrupted = _streaming_fit(tmp_path / "a", shard_files, bpe_tokenizer_path, max_steps=6)
    every_3 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    _streaming_fit(tmp_path / "b", shard_files, bpe_tokenizer_path, max_steps=3, callbacks=[every_3])
    ckpt = next((tmp_path / "ckpt").glob("*step=3.ckpt"))
    resumed = _streaming_fit(
        tmp_path / "c", shard_files, bpe_tokenizer_path, max_steps=6, ckpt_path=str(ckpt)
    )
    for a, b in zip(uninterrupted.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    # Without the loader's state the stream restarts, steps 4-6 see blocks 1-12 again, and the weights differ.
    state = torch.load(ckpt, weights_only=True)
    del state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    torch.save(state, tmp_path / "no_loader_state.ckpt")
    restarted = _streaming_fit(
        tmp_path / "d",
        shard_files,
        bpe_tokenizer_path,
        max_steps=6,
        ckpt_path=str(tmp_path / "no_loader_state.ckpt"),
    )
    params = zip(restarted.model.parameters(), uninterrupted.model.parameters(), strict=True)
    assert not all(torch.equal(a, b) for a, b in params)


def test_streaming_fit_by_time_alone_runs_with_a_constant_schedule(tmp_path, shard_files, bpe_tokenizer_path):
    # No max_steps: the time limit ends the run (a decaying schedule cannot know its length and is refused).
    with pytest.raises(RunError, match="set --trainer.max_steps"):
        _streaming_fit(
            tmp_path / "a", shard_files, bpe_tokenizer_path, -1, scheduler="linear", max_time={"seconds": 2}
        )
    model = _streaming_fit(tmp_path / "b", shard_files, bpe_tokenizer_path, -1, max_time={"seconds": 2})
    assert model.trainer.global_step > 0
