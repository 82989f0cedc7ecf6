"""A small, seeded, synthetic sentiment set: the offline quickstart's data.

The sentences are generated from templates and word lists (positive and negative
opinions about films, food, books, ...). They are *synthetic*: good for checking
that a pipeline learns, not for judging a model.
"""

from __future__ import annotations

import random
from typing import Any

from typing_extensions import override

from lightning_delta.data.text import TextClassificationData

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


class SyntheticSentimentData(TextClassificationData):
    """Train/validation/test splits of :func:`synthetic_sentiment` (labels: 0 negative, 1 positive).

    Args:
        tokenizer: tokenizer name or folder; by default the model's.
        num_train: training examples.
        num_val: validation (and test) examples.
        batch_size: examples per batch.
        max_length: truncation length in tokens; batches are padded dynamically.
        seed: the generator's seed; validation and test use ``seed + 1`` and ``seed + 2``.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        num_train: int = 1024,
        num_val: int = 256,
        batch_size: int = 32,
        max_length: int = 32,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        for name, value in (("num_train", num_train), ("num_val", num_val)):
            if value < 1:
                raise ValueError(f"{name}={value} must be at least 1")
        super().__init__(tokenizer=tokenizer, max_length=max_length, batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters()
        self.num_train, self.num_val, self.seed = num_train, num_val, seed

    @override
    def load(self) -> dict[str, Any]:
        import datasets

        sizes = {"train": self.num_train, "validation": self.num_val, "test": self.num_val}
        splits = {}
        for offset, (split, n) in enumerate(sizes.items()):
            rows = synthetic_sentiment(n, self.seed + offset)
            splits[split] = datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]})
        return splits
