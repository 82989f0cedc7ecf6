"""Data modules for text classification and language modeling from the hub or local files."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_delta.data.splits import load_splits, require_columns
from lightning_delta.hf_compat import load_pretrained
from lightning_delta.tasks.backbones import resolve_source

SPLITS = ("train", "validation", "test")



def encode_splits(splits: dict[str, Any], encode: Any) -> dict[str, Any]:
    """``encode`` mapped over each split in batches, without a progress bar per split (tokenizing a few
    thousand rows takes a second; the bars were most of a run's output)."""
    import datasets

    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        return {s: ds.map(encode, batched=True, remove_columns=ds.column_names) for s, ds in splits.items()}
    finally:
        if not quiet:
            datasets.enable_progress_bars()

class _TokenizedData(pl.LightningDataModule):
    """Shared parts: sources, tokenizer (the model's by default), splits and loaders."""

    def __init__(self, dataset: str | None, dataset_config: str | None,
                 data_files: Mapping[str, str | Sequence[str]] | None, tokenizer: str | None,
                 max_length: int, batch_size: int, num_workers: int) -> None:
        super().__init__()
        for name, value in (("max_length", max_length), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name}={value} must be at least 1")
        if data_files is not None:
            unknown = sorted(set(data_files) - set(SPLITS))
            if unknown:
                raise ValueError(f"data_files has unknown splits {unknown}; use {list(SPLITS)}")
        self.dataset, self.dataset_config, self.data_files = dataset, dataset_config, data_files
        self.tokenizer, self.max_length = tokenizer, max_length
        self.batch_size, self.num_workers = batch_size, num_workers
        self.splits: dict[str, Any] = {}
        self.collate: Any = None

    def tokenizer_source(self) -> str:
        """The tokenizer's name or folder: ``tokenizer`` if given, else the model's source."""
        if self.tokenizer is not None:
            return resolve_source(self.tokenizer)
        model = self.trainer.lightning_module if self.trainer is not None else None
        source = getattr(model, "source", None)
        if source is None:
            raise ValueError(f"{type(self).__name__}: pass tokenizer=<name or folder>; the model names no source")
        return source

    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return load_pretrained(AutoTokenizer, self.tokenizer_source())

    def load(self) -> dict[str, Any]:
        loaded = load_splits(self.dataset, self.dataset_config, self.data_files)
        if "train" not in loaded:
            raise ValueError(f"the data has no 'train' split (it has {list(loaded)})")
        return {split: loaded[split] for split in SPLITS if split in loaded}

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader | list:
        if split not in self.splits:
            return []
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle,
                          collate_fn=self.collate, num_workers=self.num_workers)

    @override
    def train_dataloader(self) -> DataLoader | list:
        return self._loader("train", shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader | list:
        return self._loader("validation")

    @override
    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test")

    @override
    def predict_dataloader(self) -> DataLoader | list:
        return self._loader("test" if "test" in self.splits else "validation")


class TextClassificationData(_TokenizedData):
    """Labelled text (single sentences or pairs) for :class:`~lightning_delta.tasks.SequenceClassification`.

    Args:
        dataset: a hub dataset name (needs network), e.g. ``"glue"``.
        dataset_config: its configuration, e.g. ``"sst2"``.
        data_files: local files by split (``train``, ``validation``, ``test``); csv, tsv, json, jsonl or parquet.
        text_column: the text column.
        text_pair_column: the second text of a pair task, or ``None``.
        label_column: the label column: integers in ``[0, num_labels)`` or label names.
        label_names: the order of label names (names are mapped to their index); by default
            the sorted names of the training split. Integer labels are checked against the
            model's ``num_labels``.
        tokenizer: tokenizer name or folder; by default the model's.
        max_length: truncation length in tokens; batches are padded dynamically.
        batch_size: examples per batch.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        dataset: str | None = None,
        dataset_config: str | None = None,
        data_files: dict[str, str | list[str]] | None = None,
        text_column: str = "text",
        text_pair_column: str | None = None,
        label_column: str = "label",
        label_names: list[str] | None = None,
        tokenizer: str | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
    ) -> None:
        super().__init__(dataset, dataset_config, data_files, tokenizer, max_length, batch_size, num_workers)
        self.save_hyperparameters()
        self.text_column, self.text_pair_column, self.label_column = text_column, text_pair_column, label_column
        self.label_names = label_names

    def _label_index(self, splits: dict[str, Any]) -> dict[str, int] | None:
        """Label name -> id for named labels (``None`` for integer labels, checked against ``num_labels``)."""
        column = self.label_column
        if isinstance(splits["train"][0][column], str):
            names = self.label_names or sorted(set(splits["train"][column]))
            for split, ds in splits.items():
                unknown = sorted(set(ds[column]) - set(names))
                if unknown:
                    raise ValueError(f"split {split!r} has labels {unknown[:5]} not among label_names {names}")
            self.label_names = list(names)
            return {name: i for i, name in enumerate(names)}
        model = getattr(self.trainer, "lightning_module", None)
        num_labels = getattr(model, "hparams", {}).get("num_labels")
        if num_labels is not None:
            for split, ds in splits.items():
                bad = sorted({v for v in ds[column] if not 0 <= v < num_labels})
                if bad:
                    raise ValueError(
                        f"split {split!r} has labels {bad[:5]} outside [0, {num_labels}); set the model's"
                        " num_labels to the number of classes, or fix the data"
                    )
        return None

    @override
    def setup(self, stage: str) -> None:
        if self.splits:
            return
        from transformers import DataCollatorWithPadding

        splits = self.load()
        require_columns(splits, {"text_column": self.text_column, "text_pair_column": self.text_pair_column,
                                 "label_column": self.label_column})
        index = self._label_index(splits)
        tokenizer = self.load_tokenizer()
        text, pair, label, max_length = self.text_column, self.text_pair_column, self.label_column, self.max_length

        def encode(rows: dict[str, list]) -> dict[str, list]:
            encoded = tokenizer(rows[text], rows[pair] if pair else None, truncation=True, max_length=max_length)
            return {**encoded, "labels": [index[v] for v in rows[label]] if index else rows[label]}

        self.splits = encode_splits(splits, encode)
        self.collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")


class TextData(_TokenizedData):
    """Text for causal language modeling, or source/target pairs for sequence-to-sequence.

    Args:
        dataset: a hub dataset name (needs network), e.g. ``"wikitext"``.
        dataset_config: its configuration, e.g. ``"wikitext-2-raw-v1"``.
        data_files: local files by split; txt (one example per line), csv, tsv, json, jsonl or parquet.
        text_column: the text (causal) or source text (seq2seq) column; ``text`` for txt files.
        target_column: the target text column for seq2seq; ``None`` for causal LM.
        tokenizer: tokenizer name or folder; by default the model's.
        max_length: truncation length in tokens (sources and targets).
        batch_size: examples per batch.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        dataset: str | None = None,
        dataset_config: str | None = None,
        data_files: dict[str, str | list[str]] | None = None,
        text_column: str = "text",
        target_column: str | None = None,
        tokenizer: str | None = None,
        max_length: int = 128,
        batch_size: int = 8,
        num_workers: int = 0,
    ) -> None:
        super().__init__(dataset, dataset_config, data_files, tokenizer, max_length, batch_size, num_workers)
        self.save_hyperparameters()
        self.text_column, self.target_column = text_column, target_column

    @override
    def setup(self, stage: str) -> None:
        if self.splits:
            return
        from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq

        text, target, max_length = self.text_column, self.target_column, self.max_length
        splits = self.load()
        require_columns(splits, {"text_column": text, "target_column": target})
        splits = {s: ds.filter(lambda row: bool(row[text].strip())) for s, ds in splits.items()}
        require_columns(splits, {})  # no split may be left empty by dropping blank lines
        tokenizer = self.load_tokenizer()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token

        def encode(rows: dict[str, list]) -> dict[str, list]:
            targets = rows[target] if target else None
            return dict(tokenizer(rows[text], text_target=targets, truncation=True, max_length=max_length))

        self.splits = encode_splits(splits, encode)
        if target:
            self.collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")
        else:
            self.collate = DataCollatorForLanguageModeling(tokenizer, mlm=False, return_tensors="pt")
