"""CausalLMDataModule: texts -> fixed-length blocks, or fine-tuning examples -> rows, for causal LMs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lm_lightning.data import examples, formats, preference
from lm_lightning.data.formats import DataFormat
from lm_lightning.data.global_batches import training_units
from lm_lightning.data.loaders import map_style_loader
from lm_lightning.data.packing import (
    CACHE_FORMAT_VERSION,
    check_short_splits,
    default_cache_root,
    is_cached,
    read_block_cache,
    write_block_cache,
)
from lm_lightning.data.prompts import ChatPromptBatch, read_prompts, render_chat_prompts
from lm_lightning.data.settings import DataSettings, check_data_settings
from lm_lightning.data.sources import ScratchFolder, TextSource, fingerprint, hold_out_validation
from lm_lightning.data.streaming import streaming_loader
from lm_lightning.data.strided import StridedWindows, split_stream
from lm_lightning.data.tokenizer import (
    cached_bpe_tokenizer,
    load_tokenizer,
    tokenizer_files_fingerprint,
    tokenizer_fingerprint,
)
from lm_lightning.errors import RunError, check_compatible


class CausalLMDataModule(L.LightningDataModule):
    """Texts tokenized, concatenated and cut into ``block_size`` blocks; batches of ``input_ids``. Or
    prompt-completion pairs or chats (``lm_lightning.data.formats``), with the loss on the completion or
    the assistant turns, one example a row or packed (``lm_lightning.data.examples``).

    Give exactly one source: ``dataset_name`` (a Hugging Face hub dataset), ``data_files`` (local .txt,
    .json/.jsonl, .csv or .parquet files: a path, a glob, or a mapping split -> path), ``corpus`` (a
    built-in corpus, ``python-docs``) or ``dataset`` (an in-memory ``DatasetDict``, from Python).

    The ``validation`` (and ``test``) split of the source is used when present; otherwise
    ``validation_split_percentage`` of the train rows is held out with a generator seeded by ``seed``.

    ``prepare_data`` tokenizes and packs once into an on-disk cache keyed by the source, the tokenizer
    and the packing settings; ``setup`` only memory-maps it. Labels are not stored: they are the input
    ids, and the model shifts them. Each block has ``block_size`` tokens and so ``block_size - 1``
    next-token targets.

    Args:
        tokenizer: Hub name or local folder of a fast tokenizer, or a tokenizer object. Default: the model's
            own (the ``model_name_or_path`` of the module being trained, or its checkpoint's); from scratch,
            give one or set ``train_tokenizer_vocab_size``.
        dataset_name: Hub dataset name, e.g. ``wikitext``.
        dataset_config_name: Hub dataset config, e.g. ``wikitext-2-raw-v1``.
        data_files: Local file(s): a path or glob (the train split), or a mapping split name -> path.
        corpus: A built-in corpus that needs no network: ``python-docs``.
        dataset: An in-memory ``datasets.DatasetDict`` (or ``Dataset``, taken as train).
        text_column: The column holding the text.
        block_size: Tokens per block; default ``min(tokenizer.model_max_length, 1024)``.
        validation_split_percentage: Share of train rows held out when the source has no validation split.
        eos_between_texts: Insert the EOS token after each non-empty text (document boundary marker).
        train_tokenizer_vocab_size: Train a byte-level BPE tokenizer of this size on the train split
            (cached), instead of loading ``tokenizer``.
        batch_size: Training batch size.
        eval_batch_size: Validation/test batch size; default ``batch_size``.
        num_workers: DataLoader worker processes.
        pin_memory: Pin host memory; default: when training on a GPU.
        num_proc: Processes for tokenization (``datasets.map``); default 1.
        map_batch_size: Texts per tokenization batch.
        cache_dir: Where packed blocks and trained tokenizers are cached; default
            ``$HF_DATASETS_CACHE/lm_lightning``.
        seed: Seed for the validation hold-out and the training shuffle.
        prompts: Prompts for ``predict``.
        prompts_file: A ``.txt`` (one prompt per line) or ``.jsonl`` (``prompt`` key, or ``messages``: chats
            answered through the chat template) file of prompts for ``predict``.
        streaming: Tokenize and pack the train split on the fly from a streamed ``IterableDataset`` (hub or
            local files; nothing downloaded in full, nothing cached), shards dealt to ranks and workers
            (``lm_lightning.streaming``). Repeats without end: train by ``--trainer.max_steps``. Needs a
            validation split, which stays cached and map-style. Text data only.
        format: ``auto`` (detected as trl does: ``messages`` -> ``chat``, ``chosen``/``rejected`` ->
            ``preference``, ``prompt``/``completion`` -> ``prompt_completion``, else ``text``), or one.
        completion_only_loss: The loss on the completion (a chat's assistant turns) only, else on all.
        chat_template: A Jinja chat template file for chats, instead of the tokenizer's own.
        packing: Several examples per row of ``block_size``, kept apart, instead of one a row.
        document_masking: Raw text: attention only inside each EOS-separated text (``eos_between_texts``).
        eval_stride: Evaluate by windows of ``block_size`` every ``eval_stride`` tokens, only the tokens new
            to each scored (``lm_lightning.data.strided``); default: disjoint blocks. Text only.
        skip_empty: Skip the rows whose text is null (or not a string), counted in the log; default: fail,
            naming the first such row.
    """

    def __init__(
        self,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        dataset_name: str | None = None,
        dataset_config_name: str | None = None,
        data_files: str | dict[str, str] | None = None,
        corpus: str | None = None,
        dataset: DatasetDict | Dataset | None = None,
        text_column: str = "text",
        block_size: int | None = None,
        validation_split_percentage: float = 5.0,
        eos_between_texts: bool = False,
        train_tokenizer_vocab_size: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        num_proc: int | None = None,
        map_batch_size: int = 1000,
        cache_dir: str | None = None,
        seed: int = 42,
        prompts: list[str] | None = None,
        prompts_file: str | None = None,
        streaming: bool = False,
        format: DataFormat = "auto",
        completion_only_loss: bool = True,
        chat_template: str | None = None,
        packing: bool = False,
        document_masking: bool = False,
        eval_stride: int | None = None,
        skip_empty: bool = False,
    ) -> None:
        super().__init__()
        self.settings = DataSettings.of(locals())  # the cache key is made of these (see DataSettings)
        formats.check_format_settings(
            format, streaming, eos_between_texts, document_masking, eval_stride, block_size
        )
        self.source = TextSource(dataset_name, dataset_config_name, data_files, corpus, dataset)
        if not self.source.given and prompts is None and prompts_file is None:
            raise ValueError(
                "Give exactly one data source, got none: set one of --data.dataset_name (hub), "
                "--data.data_files (local files), --data.corpus (built-in: python-docs) or dataset= (an "
                "in-memory DatasetDict, from Python)."
            )
        check_data_settings(
            tokenizer=tokenizer,
            train_tokenizer_vocab_size=train_tokenizer_vocab_size,
            block_size=block_size,
            validation_split_percentage=validation_split_percentage,
            batch_sizes={"batch_size": batch_size, "eval_batch_size": eval_batch_size},
            prompts=prompts,
            prompts_file=prompts_file,
            streaming=streaming,
            in_memory_or_builtin=dataset is not None or corpus is not None,
        )
        # The tokenizer is the model's hyperparameter (the CLI links it there, the module records the one it
        # takes from here): saved twice, Lightning refuses to log the two when the module's was left unset.
        self.save_hyperparameters(ignore=["dataset", "tokenizer"])
        self.tokenizer_spec = tokenizer
        self.text_column = text_column
        self._block_size = block_size
        self.validation_split_percentage = validation_split_percentage
        self.eos_between_texts = eos_between_texts
        self.train_tokenizer_vocab_size = train_tokenizer_vocab_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.num_proc = num_proc or 1
        self.map_batch_size = map_batch_size
        self.cache_root = Path(cache_dir) if cache_dir else default_cache_root()
        self.seed = seed
        self.has_source = self.source.given
        # Read now: a missing or empty prompts file fails before any model is loaded.
        self.prompts = read_prompts(prompts_file) if prompts_file is not None else prompts
        self.prompts_file = prompts_file
        self.streaming = streaming
        self.format_setting = format
        self.data_format: str | None = None if format == "auto" else format  # detected from the columns
        self.completion_only_loss = completion_only_loss
        self.chat_template = formats.read_chat_template(chat_template)  # read now: a missing file fails first
        self.packing = packing
        self.document_masking = document_masking
        self.eval_stride = eval_stride
        self.skip_empty = skip_empty
        self.tails: dict[str, Any] = {}  # per text split, its tokens after the last full block
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._tokenizer_path: str | None = tokenizer if isinstance(tokenizer, str) else None
        self.datasets: dict[str, Dataset] = {}
        self.cache_path: Path | None = None
        self._raw: DatasetDict | None = None  # the source, when loading it was needed for the cache key
        self._held_out = False
        # datasets' Arrow copy of local files, needed only until the blocks are cached: a scratch folder.
        self._scratch = ScratchFolder(self.cache_root / "scratch")
        # Many tokenizer processes already use the cores: keep each single-threaded (and silent when
        # DataLoader workers fork). One process: let the Rust tokenizer use all cores.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false" if self.num_proc > 1 else "true")

    # ----------------------------------------------------------------------------- sources
    def load_raw(self) -> DatasetDict:
        """The source's text splits (``train``, ``validation``, and ``test`` when present)."""
        if not self.has_source:
            raise ValueError(
                "No data source: set one of --data.dataset_name, --data.data_files or --data.corpus "
                "(only predict works on prompts alone)."
            )
        formats.check_file_columns(self.source.file_columns(), self.text_column, self.format_setting)
        try:
            return self._load_raw()
        except BaseException:
            self._scratch.remove()  # no copy of the files left behind by a run that stops here
            raise

    def _load_raw(self) -> DatasetDict:
        files_cache = self._scratch.get() if self.source.data_files is not None else None
        raw = self.source.load(streaming=self.streaming, files_cache=files_cache)
        # validate and test need only their split (a validation split is held out of train when missing).
        stage = self.trainer.state.fn if self.trainer is not None else None
        needs_train = stage in (None, "fit") or (stage == "validate" and "validation" not in raw)
        if "train" not in raw and not self.streaming and needs_train:
            raise ValueError(f"The data source has no 'train' split; its splits are {list(raw)}.")
        self.data_format = formats.resolve_format(raw, self.text_column, self.format_setting, self.skip_empty)
        formats.check_text_only(self.data_format, self.streaming, self.document_masking, self.eval_stride)
        if self.data_format != "text":
            self._held_out = "validation" not in raw
            raw = examples.add_row_numbers(raw)
        if "validation" not in raw and self.streaming:
            raise ValueError(
                "streaming=True needs a validation split in the source (a streamed train split cannot be "
                "held out from): give --data.data_files.validation, or set --data.streaming false."
            )
        return hold_out_validation(raw, self.validation_split_percentage, self.seed)

    # ----------------------------------------------------------------------------- tokenizer
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer (loaded, or trained and cached, on first use)."""
        if self._tokenizer is None:
            if self.train_tokenizer_vocab_size is not None:
                self._tokenizer = self._trained_tokenizer(self.load_raw())
            elif self.tokenizer_spec is not None:
                self._tokenizer = load_tokenizer(self.tokenizer_spec)
            else:
                self._tokenizer = self._model_tokenizer()
        return self._tokenizer

    def _model_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer of the model being trained: its own object, else that of its pretrained folder."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None:
            raise RunError(
                "No tokenizer: tokenizer=None takes the tokenizer of the model being trained, and this data "
                "module is used outside a Trainer. Pass tokenizer= (a hub name, folder or tokenizer) or "
                "train_tokenizer_vocab_size=."
            )
        if getattr(module, "tokenizer", None) is not None:
            return load_tokenizer(module.tokenizer)
        name = getattr(module, "hparams", {}).get("model_name_or_path")
        if name is None:
            raise RunError(
                "No tokenizer: the model is trained from scratch, so it has none of its own. Set "
                "--data.tokenizer (a hub name or folder) or --data.train_tokenizer_vocab_size N (train a BPE "
                "tokenizer on the data), or set --model.model_name_or_path to fine-tune a pretrained model."
            )
        self._tokenizer_path = name
        return load_tokenizer(name)

    def use_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Tokenize with ``tokenizer`` (a checkpoint's own), whatever the settings said."""
        self.tokenizer_spec = self._tokenizer = load_tokenizer(tokenizer)
        self.train_tokenizer_vocab_size = None
        self.cache_path = None

    @property
    def tokenizer_path(self) -> str | None:
        """A name or folder that ``AutoTokenizer.from_pretrained`` loads this tokenizer from, if any."""
        if self._tokenizer_path is None and self.train_tokenizer_vocab_size is not None:
            self.tokenizer  # noqa: B018 - trains or loads it, and sets the path
        return self._tokenizer_path

    def _trained_tokenizer(self, raw: DatasetDict) -> PreTrainedTokenizerBase:
        tokenizer, self._tokenizer_path = cached_bpe_tokenizer(
            raw["train"], self.text_column, self.train_tokenizer_vocab_size, self.cache_root
        )
        return tokenizer

    @property
    def block_size(self) -> int:
        """Tokens per block."""
        if self._block_size is None:
            self._block_size = min(int(self.tokenizer.model_max_length), 1024)
        return self._block_size

    # ----------------------------------------------------------------------------- cache
    def _cache_path(self) -> Path:
        """The cache folder of this module's blocks, keyed by the source, the tokenizer and every setting that
        changes the cached rows (``DataSettings.key``).

        Local files are keyed by path, size and modification time (what ``datasets`` keys them by) and a
        tokenizer folder by its files' bytes, so a warm start reads neither the texts nor the tokenizer.
        Other sources are keyed by their ``datasets`` fingerprint, which needs them loaded (kept for
        ``prepare_data`` in ``_raw``); a tokenizer object by its serialised form.
        """
        if self.cache_path is None:
            source: Any = self.source.files_fingerprint()
            if source is None:
                self._raw = self.load_raw()  # fingerprinted after the hold-out of validation rows
                source = {split: ds._fingerprint for split, ds in self._raw.items()}
            if isinstance(self.tokenizer_spec, str) and os.path.isdir(self.tokenizer_spec):
                tokenizer_key = tokenizer_files_fingerprint(self.tokenizer_spec)
            else:
                tokenizer_key = tokenizer_fingerprint(self.tokenizer)
            held_out = self.source.data_files is not None and "validation" not in self.source.data_files
            settings = self.settings.key(
                held_out, block_size=self.block_size, chat_template=self.chat_template, num_proc=self.num_proc
            )
            key = fingerprint([CACHE_FORMAT_VERSION, source, tokenizer_key, settings])
            self.cache_path = self.cache_root / "blocks" / key
        return self.cache_path

    def prepare_data(self) -> None:
        """Tokenize and pack every split into the on-disk cache, unless it is there already."""
        if not self.has_source or self._predicting():
            return
        module = self.trainer.lightning_module if self.trainer is not None else None
        if callable(
            getattr(module, "build_config", None)
        ):  # before any block is cached (a plain Trainer too)
            check_compatible(module.build_config(self.tokenizer), self.tokenizer, self.block_size)
        path = self._cache_path()
        raw, self._raw = self._raw, None  # not kept: the module holds only the packed blocks
        if is_cached(path):
            return
        try:
            self._write_blocks(raw if raw is not None else self.load_raw(), path)
        finally:
            self._scratch.remove()

    def _write_blocks(self, raw: DatasetDict, path: Path) -> None:
        if self.data_format != "text":
            settings = ("completion_only_loss", "chat_template", "packing", "map_batch_size", "num_proc")
            preference.example_cache_writer(self.data_format)(
                raw, path, self.tokenizer, self.data_format, self.block_size, self._held_out,
                **{name: getattr(self, name) for name in settings},
            )  # fmt: skip
            return
        write_block_cache(
            raw,
            path,
            self.tokenizer,
            text_column=self.text_column,
            block_size=self.block_size,
            eos_between_texts=self.eos_between_texts,
            map_batch_size=self.map_batch_size,
            num_proc=self.num_proc,
            skip_empty=self.skip_empty,
            short_ok=frozenset({"validation", "test"} if self.eval_stride else ()),  # one window will do
        )

    def setup(self, stage: str | None = None) -> None:
        """Memory-map the packed blocks from the cache (packing them first if absent)."""
        if self.datasets or stage == "predict" or not self.has_source:
            return
        path = self._cache_path()
        if not is_cached(path):
            self.prepare_data()
        self._raw = None
        self.datasets, self.data_format, self.tails = read_block_cache(path)
        check_short_splits(self.datasets, self.tails, self.block_size, strided=bool(self.eval_stride))
        formats.check_text_only(self.data_format, self.streaming, self.document_masking, self.eval_stride)
        if self.streaming:
            self.train_texts = self.source.stream_train()
            formats.check_streamed_format(self.train_texts, self.text_column, self.format_setting)

    def _predicting(self) -> bool:
        trainer = self.trainer
        return trainer is not None and trainer.state.fn == "predict"

    # ----------------------------------------------------------------------------- loaders
    def _pin(self) -> bool:
        if self.pin_memory is not None:
            return self.pin_memory
        trainer = self.trainer
        return bool(trainer is not None and trainer.strategy.root_device.type == "cuda")

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        if split == "train" and self.streaming:
            return self._streaming_loader()
        if split not in self.datasets:
            if not self.has_source:
                self.load_raw()  # raises: there is nothing to load
            self.setup()
        if split not in self.datasets:
            raise ValueError(f"The data source has no {split!r} split; it has {list(self.datasets)}.")
        dataset, collate_fn = self.datasets[split], self._collate_fn()
        if self.eval_stride and not shuffle:
            stream = split_stream(dataset, self.tails[split])
            dataset = StridedWindows(stream, self.block_size, self.eval_stride)
            collate_fn = examples.PadCollator(self.tokenizer.pad_token_id or 0)
        # Training: each row's weight in the loss, from which the loader plans every optimizer step's total.
        eos = self.tokenizer.eos_token_id if self.document_masking else None
        units = training_units(self.trainer, dataset, eos) if shuffle else None
        return map_style_loader(
            dataset, batch_size=batch_size, shuffle=shuffle, trainer=self.trainer, seed=self.seed,
            num_workers=self.num_workers, pin_memory=self._pin(), collate_fn=collate_fn, units=units,
        )  # fmt: skip

    def _collate_fn(self) -> Any:
        """Examples padded per batch; raw-text blocks as they are, or with their documents kept apart."""
        if self.data_format not in (None, "text"):
            return preference.example_collator(self.data_format, self.tokenizer.pad_token_id or 0)
        if self.document_masking:
            return examples.DocumentMaskingCollator(self.tokenizer.eos_token_id)
        return examples.BlockCollator()

    def _streaming_loader(self) -> DataLoader:
        if not self.datasets:
            self.setup()
        return streaming_loader(self, self._collate_fn())

    def train_dataloader(self) -> DataLoader:
        """Training blocks, shuffled with a generator seeded by ``seed``; resumable mid-epoch."""
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation blocks, in order."""
        return self._loader("validation", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test blocks, in order."""
        return self._loader("test", self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Batches (lists) of prompt strings from ``prompts`` or ``prompts_file``."""
        if self.prompts is None:
            raise ValueError(
                "predict needs prompts: set --data.prompts '[\"Once upon a time\"]' or "
                "--data.prompts_file FILE."
            )
        prompts, collate_fn = self.prompts, list
        if not isinstance(prompts[0], str):  # chats, answered through the chat template
            template = formats.chat_template_of(self.tokenizer, self.chat_template)
            prompts, end_of_turn = render_chat_prompts(self.tokenizer, self.prompts, template)
            collate_fn = ChatPromptBatch(end_of_turn)
        return DataLoader(prompts, batch_size=self.eval_batch_size, shuffle=False, collate_fn=collate_fn)
