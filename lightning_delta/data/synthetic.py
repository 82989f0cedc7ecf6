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
#: Each clause kind, its templates, and how the label follows from the adjectives: a plain opinion
#: (the adjective's polarity), a negated one (the opposite), and a turn of opinion (the last clause
#: decides; the first says the opposite). Words alone do not tell the label: a frozen sentence
#: embedding with a linear head trails a tuned encoder on this set (see the README's set-up figures).
PLAIN = (
    "{s} was {a}.", "I found {s} {a}.", "Honestly, {s} is {a} and {b}.", "In my opinion {s} felt {a}.",
    "{S} turned out {a}, really {b}.", "Everyone agreed that {s} was {a}.", "{S}? Simply {a}.",
)
NEGATED = (
    "{s} was not {a}.", "I did not find {s} {a} at all.", "{S} was never {a}.", "Nobody thought {s} was {a}.",
    "{S} is not {a}, not {b} either.", "{S}? Far from {a}.",
)
TURN = (
    "I expected {s} to be {x}, but it was {a}.", "{S} looked {x} at first, then it was {a}.",
    "They said {s} would be {x}; it was {a}.", "{S} started {x} but ended up {a}.",
)
LABEL_NAMES = ("negative", "positive")


def synthetic_sentiment(n: int, seed: int) -> list[tuple[str, int]]:
    """``n`` (sentence, label) pairs, balanced, reproducible for a given ``seed``; label 1 is positive.

    A third of the sentences are plain opinions, a third negate the adjective, a third turn from one
    opinion to the other, so the label depends on how the words are put together.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        kind = (PLAIN, NEGATED, TURN)[rng.randrange(3)]
        said = label if kind is not NEGATED else 1 - label  # the polarity of the adjectives used
        a, b = rng.sample(POSITIVE if said else NEGATIVE, 2)
        x = rng.choice(NEGATIVE if said else POSITIVE)  # the opinion a turn starts from
        subject = rng.choice(SUBJECTS)
        text = rng.choice(kind).format(s=subject, S=subject.capitalize(), a=a, b=b, x=x)
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
