"""Activation checkpointing of a frozen backbone: same losses and delta gradients, real
recomputation, selective layers, and a clear error for reentrant checkpointing."""

import pickle

import lightning.pytorch as pl
import pytest
import torch

from lightning_delta import DeltaCallback, DeltaConfigError, DeltaModel, attach, trainable_parameters
from lightning_delta.recompute import disable_checkpointing, enable_checkpointing
from lightning_delta.distributed import repeated_blocks
from lightning_helpers import trainer
from models import FAMILIES, family_inputs

CASES = [(m, f) for m in ("lora", "adapter", "prompt", "prefix") for f in ("bert", "gpt2", "t5")]


def loss_of(model, family):
    inputs = family_inputs(family)
    if family == "t5":
        labels = inputs.pop("decoder_input_ids")
    else:
        labels = torch.tensor([0, 1]) if family == "bert" else inputs["input_ids"]
    return model(**inputs, labels=labels).loss


def loss_and_grads(model, handle, family):
    for p in handle.delta_parameters():
        p.grad = None
    loss = loss_of(model, family)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in handle.delta_parameters()]


@pytest.mark.parametrize(("method", "family"), CASES)
def test_same_loss_and_delta_gradients_with_checkpointing(method, family):
    model = FAMILIES[family]().train()  # the tiny models have no dropout: runs are deterministic
    handle = attach(model, method).freeze_backbone()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in handle.delta_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    plain_loss, plain_grads = loss_and_grads(model, handle, family)
    assert enable_checkpointing(model)
    loss, grads = loss_and_grads(model, handle, family)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in plain_grads)
    for got, want in zip(grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def count_calls(module):
    calls = []
    module.register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("every", [1, 2])
def test_recomputation_happens_in_the_checkpointed_blocks_only(every):
    model = FAMILIES["gpt2"](layers=4).train()
    attach(model, "lora").freeze_backbone()
    blocks = repeated_blocks(model)
    calls = [count_calls(b.attn.c_attn.lora) for b in blocks]  # a delta inside each block
    enable_checkpointing(model, every_n_layers=every)
    loss_of(model, "gpt2").backward()
    assert [len(c) for c in calls] == [2 if i % every == 0 else 1 for i in range(4)]
    disable_checkpointing(model)
    for c in calls:
        c.clear()
    loss_of(model, "gpt2").backward()
    assert [len(c) for c in calls] == [1, 1, 1, 1]


def test_no_recomputation_in_eval_or_without_grad():
    model = FAMILIES["bert"]().eval()
    attach(model, "lora").freeze_backbone()
    calls = count_calls(repeated_blocks(model)[0].intermediate)
    enable_checkpointing(model)
    with torch.no_grad():
        loss_of(model, "bert")
    assert len(calls) == 1


def test_reentrant_request_is_refused_with_the_fix():
    with pytest.raises(DeltaConfigError, match="reentrant=True.*Use reentrant=False"):
        enable_checkpointing(FAMILIES["bert"](), reentrant=True)


def test_checkpointed_model_pickles_and_keeps_its_names():
    model = FAMILIES["gpt2"]()
    attach(model, "lora")
    names = list(model.state_dict())
    enable_checkpointing(model)
    assert list(model.state_dict()) == names
    clone = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(loss_of(clone.eval(), "gpt2"), loss_of(model.eval(), "gpt2"))


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = FAMILIES["gpt2"]()
        self.calls = count_calls(repeated_blocks(self.model)[0].mlp.c_fc)  # a backbone module inside a block

    def training_step(self, batch, batch_idx):
        return loss_of(self.model, "gpt2")

    def train_dataloader(self):
        return torch.utils.data.DataLoader(range(2), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(trainable_parameters(self), lr=0.1)


def test_callback_turns_it_on(tmp_path):
    module = Tiny()
    trainer(tmp_path, [DeltaCallback("lora", gradient_checkpointing=True)], max_steps=2).fit(module)
    assert len(module.calls) == 4  # two steps, each block forward run twice
    assert DeltaModel(module.model).deltas()


def test_ready_tasks_take_the_flag(tmp_path):
    from lightning_delta.data import TextData
    from lightning_delta.tasks import CausalLanguageModeling
    from models import save_tiny

    (tmp_path / "t.txt").write_text("one two three\nfour five six\n")
    task = CausalLanguageModeling(save_tiny("gpt2", tmp_path / "gpt2"), gradient_checkpointing=True)
    calls = count_calls(repeated_blocks(task.model)[0].mlp.c_fc)
    trainer(tmp_path, [DeltaCallback("lora")], max_steps=1).fit(
        task, TextData(data_files={"train": str(tmp_path / "t.txt")}, batch_size=2))
    assert len(calls) == 2  # one step: the block ran forward twice
