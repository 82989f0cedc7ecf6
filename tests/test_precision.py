"""Half-precision backbones with fp32 deltas: dtypes after setup, optimizer state, training, overrides."""

import lightning.pytorch as pl
import pytest
import torch
from lightning_helpers import trainer
from models import tiny_bert
from torch import nn

from lightning_delta import DeltaCallback, DeltaModel, LoraConfig, attach, trainable_parameters
from lightning_delta.engine import attach_config

HALF = {"bf16-true": torch.bfloat16, "16-true": torch.float16}


class FixedBatch(pl.LightningModule):
    """A tiny BERT classifier fitting one fixed batch: its loss must fall."""

    def __init__(self):
        super().__init__()
        self.model = tiny_bert()
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 99, (8, 8), generator=gen)
        self.labels = torch.arange(8) % 2
        self.losses, self.seen_dtypes = [], {}

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=self.ids, labels=self.labels).loss
        self.losses.append(loss.item())
        return loss

    def train_dataloader(self):
        return torch.utils.data.DataLoader(range(30), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.AdamW(trainable_parameters(self), lr=1e-2)

    def on_train_start(self):
        handle = DeltaModel(self.model)
        delta = {id(p) for p in handle.delta_parameters()}
        self.seen_dtypes = {
            "delta": {p.dtype for p in handle.delta_parameters()},
            "head": {p.dtype for p in self.model.classifier.parameters()},
            "backbone": {p.dtype for n, p in self.model.named_parameters()
                         if id(p) not in delta and not n.startswith("classifier.")},
        }


@pytest.mark.parametrize("method", ["lora", "bitfit"])
@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_true_half_backbone_trains_fp32_deltas(tmp_path, precision, method):
    module = FixedBatch()
    t = trainer(tmp_path, [DeltaCallback(method, trainable="classifier")], precision=precision, max_epochs=1)
    t.fit(module)
    assert module.seen_dtypes == {"delta": {torch.float32}, "head": {torch.float32}, "backbone": {HALF[precision]}}
    states = [s for s in t.optimizers[0].state.values()]
    assert states and all(v.dtype == torch.float32 for s in states for k, v in s.items() if k != "step")
    assert all(torch.isfinite(torch.tensor(module.losses)))
    assert sum(module.losses[-5:]) < 0.8 * sum(module.losses[:5])


def test_sixteen_true_warns_about_missing_grad_scaler(tmp_path):
    with pytest.warns(UserWarning, match="no GradScaler"):
        trainer(tmp_path, [DeltaCallback("lora")], precision="16-true", max_steps=1).fit(FixedBatch())


def test_bf16_mixed_keeps_everything_fp32_and_trains(tmp_path):
    module = FixedBatch()
    trainer(tmp_path, [DeltaCallback("lora", trainable="classifier")], precision="bf16-mixed", max_epochs=1).fit(module)
    assert module.seen_dtypes == {"delta": {torch.float32}, "head": {torch.float32}, "backbone": {torch.float32}}
    assert sum(module.losses[-5:]) < 0.8 * sum(module.losses[:5])


def test_delta_dtype_overrides(tmp_path):
    module = FixedBatch()
    t = trainer(tmp_path, [DeltaCallback("lora", delta_dtype="bfloat16")], precision="bf16-true", max_steps=2)
    t.fit(module)
    assert module.seen_dtypes == {"delta": {torch.bfloat16}, "head": {torch.bfloat16}, "backbone": {torch.bfloat16}}


def test_casting_the_model_keeps_the_delta_dtype_but_moves_it():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    handle = attach(model, "lora", targets="0", r=2)
    attach(model, "bitfit", targets="1")
    params = {id(p) for p in handle.delta_parameters()}
    model.half()
    assert model[0].weight.dtype == torch.float16
    assert {p.dtype for p in handle.delta_parameters()} == {torch.float32}
    assert {id(p) for p in handle.delta_parameters()} == params  # same Parameter objects (optimizer-safe)
    out = model(torch.randn(2, 4, dtype=torch.float16))
    assert out.dtype == torch.float16
    model.to(torch.float64)
    assert {p.dtype for p in handle.delta_parameters()} == {torch.float32}


def test_initial_values_depend_only_on_seed_and_path():
    def draw(seed, targets):
        model = tiny_bert()
        attach_config(model, LoraConfig(r=2, targets=targets), seed=seed)
        return {d.path: d.module.A.clone() for d in DeltaModel(model).deltas()}

    torch.manual_seed(123)
    a = draw(7, ["query", "value"])
    torch.manual_seed(456)  # the global RNG does not matter
    b = draw(7, ["query"])
    for path, value in b.items():
        assert torch.equal(a[path], value)
    assert not torch.equal(a["bert.encoder.layer.0.attention.self.query.lora"],
                           a["bert.encoder.layer.1.attention.self.query.lora"])
    c = draw(8, ["query"])
    assert not torch.equal(c["bert.encoder.layer.0.attention.self.query.lora"],
                           b["bert.encoder.layer.0.attention.self.query.lora"])
