"""A few CPU Trainer steps per model family with nothing but DeltaCallback: loss falls, only deltas move."""

import copy

import lightning.pytorch as pl
import pytest
import torch

from lightning_delta import DeltaCallback, DeltaModel, trainable_parameters
from lightning_helpers import trainer
from models import FAMILIES, family_inputs


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


@pytest.mark.parametrize("method", ["lora", "bitfit"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_with_callback_only(tmp_path, family, method):
    module = LanguageModel(family)
    module.losses = []
    backbone = copy.deepcopy(module.model.state_dict())
    trainer(tmp_path, [DeltaCallback(method)], max_steps=12).fit(module)
    assert module.losses[-1] < module.losses[0]
    after = module.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in backbone.items())
    assert DeltaModel(module.model).summary().trainable == DeltaModel(module.model).summary().delta
