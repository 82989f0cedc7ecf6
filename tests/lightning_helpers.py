"""A tiny LightningModule around a transformers classifier, loaded from a local 'pretrained' folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_delta import attach_from_checkpoint, trainable_parameters
from models import FAMILIES, family_inputs, tiny_bert


SCRIPTS = Path(__file__).resolve().parent / "scripts"


def launch_script(name: str, *args, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs ``tests/scripts/<name>`` in a fresh process, offline (multi-process Lightning relaunches a script)."""
    return subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=600)


def script_report(name: str, out: Path, *args, env: dict[str, str] | None = None):
    """Runs a script that writes ``out/report.pt`` (rank 0) and returns the report."""
    done = launch_script(name, out, *args, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(Path(out) / "report.pt", weights_only=True)


def save_pretrained_bert(path, layers: int = 2, hidden: int = 32, seed: int = 0) -> str:
    torch.manual_seed(seed)
    tiny_bert(layers=layers, hidden=hidden).save_pretrained(path)
    return str(path)


class Classifier(pl.LightningModule):
    def __init__(self, source: str, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        from transformers import AutoModelForSequenceClassification

        self.model = AutoModelForSequenceClassification.from_pretrained(source)

    def forward(self, ids):
        return self.model(input_ids=ids).logits

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        loss = self.model(input_ids=ids, labels=labels).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        ids, labels = batch
        self.log("val_loss", self.model(input_ids=ids, labels=labels).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(trainable_parameters(self), lr=self.hparams.lr)


class ReloadableClassifier(Classifier):
    """The load_from_checkpoint recipe: attach the recorded deltas before the weights are loaded."""

    def on_load_checkpoint(self, checkpoint):
        attach_from_checkpoint(self, checkpoint)


def loader(n: int = 8, batch_size: int = 4, seq: int = 6) -> DataLoader:
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 99, (n, seq), generator=gen)
    labels = (ids[:, 0] > 50).long()
    return DataLoader(TensorDataset(ids, labels), batch_size=batch_size, shuffle=False)


def trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=str(tmp_path), max_epochs=1,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


class LanguageModel(pl.LightningModule):
    """Causal or seq2seq LM on one fixed batch (labels = inputs), so the loss must fall."""

    def __init__(self, family: str, lr: float = 0.02):
        super().__init__()
        self.family, self.lr = family, lr
        self.model = FAMILIES[family]()

    def training_step(self, batch, batch_idx):
        inputs = family_inputs(self.family, batch=4, seq=8)
        if self.family == "t5":
            labels = inputs.pop("decoder_input_ids")
        elif self.family == "bert":
            labels = (inputs["input_ids"][:, 0] > 50).long()
        else:
            labels = inputs["input_ids"]
        loss = self.model(**inputs, labels=labels).loss
        self.losses.append(loss.item())
        return loss

    def train_dataloader(self):
        return torch.utils.data.DataLoader(range(64), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.AdamW(trainable_parameters(self), lr=self.lr)
