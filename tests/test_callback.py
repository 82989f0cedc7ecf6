"""DeltaCallback: attach in setup, train only deltas, delta-only checkpoints, exact resume, reload."""

import copy
import os
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_delta import (
    CheckpointReadError,
    DeltaCallback,
    DeltaConfigError,
    DeltaModel,
    DeltaStateError,
    LoraConfig,
    load_delta,
    trainable_parameters,
)
from lightning_delta.checkpoint import META_KEY
from lightning_helpers import Classifier, ReloadableClassifier, loader, save_pretrained_bert, trainer
from models import PlainNet, plain_inputs, tiny_bert


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_pretrained_bert(tmp_path_factory.mktemp("bert"))


def delta_keys(module):
    return {k for k in module.state_dict() if ".lora." in k or k.startswith("model.classifier.")}


def lora_callback(**kw):
    return DeltaCallback("lora", r=4, trainable=["classifier"], **kw)


def test_callback_alone_trains_only_deltas_and_the_head(source, tmp_path):
    module = Classifier(source)
    original = copy.deepcopy(module.model.state_dict())
    trainer(tmp_path, [DeltaCallback("lora", trainable="classifier")], max_steps=3).fit(module, loader())
    after = module.model.state_dict()
    handle = DeltaModel(module.model)
    assert handle.deltas() and all(d.module.B.abs().sum() > 0 for d in handle.deltas())
    for key, value in original.items():
        if key.startswith("classifier."):
            assert not torch.equal(after[key], value), key
        else:
            assert torch.equal(after[key], value), key


@pytest.mark.parametrize(
    "how", ["trainer.save_checkpoint", "top_k", "weights_only", "save_last"],
)
def test_every_saving_path_writes_only_delta_tensors(source, tmp_path, how):
    module = Classifier(source)
    callbacks = [lora_callback()]
    if how != "trainer.save_checkpoint":
        callbacks.append(ModelCheckpoint(
            dirpath=tmp_path / "ckpt", monitor="train_loss", save_top_k=2 if how == "top_k" else 1,
            save_weights_only=how == "weights_only", save_last=how == "save_last", every_n_train_steps=1,
        ))
    t = trainer(tmp_path, callbacks, max_steps=3, enable_checkpointing=how != "trainer.save_checkpoint")
    t.fit(module, loader())
    if how == "trainer.save_checkpoint":
        t.save_checkpoint(tmp_path / "ckpt" / "manual.ckpt")
    files = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert files and (how != "save_last" or any(f.name == "last.ckpt" for f in files))
    expected = delta_keys(module)
    for f in files:
        ckpt = torch.load(f, weights_only=True)
        assert set(ckpt["state_dict"]) == expected, f.name
        assert (META_KEY in ckpt) is (how != "weights_only")


def test_checkpoint_records_specs_and_fingerprint(source, tmp_path):
    module = Classifier(source)
    t = trainer(tmp_path, [lora_callback()], max_steps=1)
    t.fit(module, loader())
    t.save_checkpoint(tmp_path / "a.ckpt")
    meta = torch.load(tmp_path / "a.ckpt", weights_only=True)[META_KEY]
    assert meta["backbone"] == "model" and meta["trainable"] == ["classifier"]
    assert meta["specs"] == [LoraConfig(r=4, name="lora").to_dict()]
    assert meta["fingerprint"]["source"] == source
    assert "bert.embeddings.word_embeddings.weight" in meta["fingerprint"]["shapes"]
    assert meta["fingerprint"]["samples"] and "classifier.weight" not in meta["fingerprint"]["samples"]


def test_bert_base_delta_checkpoint_is_under_five_percent(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    BertForSequenceClassification(BertConfig()).save_pretrained(tmp_path / "base")  # BERT-base shape, random
    module = Classifier(str(tmp_path / "base"))
    fp32_bytes = sum(p.numel() * 4 for p in module.parameters())
    t = trainer(tmp_path, [DeltaCallback("lora", targets=["query", "value"], r=8)], max_steps=1)
    t.fit(module, loader(n=4, batch_size=2, seq=8))
    t.save_checkpoint(tmp_path / "base.ckpt")
    size = os.path.getsize(tmp_path / "base.ckpt")
    assert size < 0.05 * fp32_bytes, (size, fp32_bytes)


def delta_values(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_resume_two_plus_two_equals_four(source, tmp_path):
    straight = Classifier(source)
    trainer(tmp_path / "a", [lora_callback()], max_epochs=2).fit(straight, loader())

    first = Classifier(source)
    t1 = trainer(tmp_path / "b", [lora_callback()], max_epochs=1)
    t1.fit(first, loader())
    t1.save_checkpoint(tmp_path / "half.ckpt")
    resumed = Classifier(source)
    t2 = trainer(tmp_path / "c", [lora_callback()], max_epochs=2)
    t2.fit(resumed, loader(), ckpt_path=tmp_path / "half.ckpt", weights_only=True)

    assert t2.global_step == 4
    want, got = delta_values(straight), delta_values(resumed)
    assert set(want) == set(got) == delta_keys(straight)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    assert not torch.allclose(want[next(iter(sorted(want)))], delta_values(first)[next(iter(sorted(want)))])


@pytest.fixture(scope="module")
def trained(source, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    module = Classifier(source)
    t = trainer(tmp, [lora_callback()], max_steps=3)
    t.fit(module, loader())
    t.save_checkpoint(tmp / "delta.ckpt")
    return module.eval(), tmp / "delta.ckpt"


def test_load_delta_into_a_fresh_module_gives_the_trained_outputs(source, trained):
    module, path = trained
    ids = loader().dataset.tensors[0]
    fresh = Classifier(source).eval()
    handle = DeltaModel(load_delta(fresh, path))
    assert set(handle.configs) == {"lora"}
    torch.testing.assert_close(fresh(ids), module(ids))


def test_load_delta_into_the_bare_transformers_model(source, trained):
    module, path = trained
    from transformers import AutoModelForSequenceClassification

    bare = AutoModelForSequenceClassification.from_pretrained(source).eval()
    load_delta(bare, path)
    ids = loader().dataset.tensors[0]
    torch.testing.assert_close(bare(input_ids=ids).logits, module(ids))


def test_load_from_checkpoint_recipe(trained):
    module, path = trained
    reloaded = ReloadableClassifier.load_from_checkpoint(path).eval()
    ids = loader().dataset.tensors[0]
    torch.testing.assert_close(reloaded(ids), module(ids))


def test_weights_only_file_needs_specs_and_then_loads(source, tmp_path, trained):
    module, _ = trained
    t = trainer(tmp_path, [lora_callback(), ModelCheckpoint(dirpath=tmp_path, save_weights_only=True)], max_steps=3,
                enable_checkpointing=True)
    weights_module = Classifier(source)
    t.fit(weights_module, loader())
    (path,) = tmp_path.glob("*.ckpt")
    with pytest.raises(DeltaStateError, match="specs="):
        load_delta(Classifier(source), path)
    fresh = Classifier(source).eval()
    load_delta(fresh, path, specs=[LoraConfig(r=4, name="lora")], trainable=["classifier"], module="model")
    ids = loader().dataset.tensors[0]
    torch.testing.assert_close(fresh(ids), weights_module.eval()(ids))


def test_delta_from_a_different_backbone_names_mismatching_keys(trained, tmp_path):
    _, path = trained
    other = Classifier(save_pretrained_bert(tmp_path / "wide", hidden=48))
    with pytest.raises(DeltaStateError, match=r"bert\.embeddings"):
        load_delta(other, path)
    assert not DeltaModel(other.model).deltas()  # nothing attached on failure
    with pytest.raises(DeltaStateError, match=r"differ in shape.*lora"):
        trainer(tmp_path, [lora_callback()], max_epochs=2).fit(other, loader(), ckpt_path=path)


def test_fewer_layer_checkpoint_is_not_silently_partial(trained, tmp_path):
    _, path = trained  # 2 layers
    deeper = Classifier(save_pretrained_bert(tmp_path / "deep", layers=3))
    with pytest.raises(DeltaStateError, match=r"layer\.2\.attention"):
        trainer(tmp_path, [lora_callback()], max_epochs=2).fit(deeper, loader(), ckpt_path=path)
    with pytest.raises(DeltaStateError, match="another backbone"):
        load_delta(Classifier(str(tmp_path / "deep")), path)


def test_same_shapes_other_weights_warns(trained, tmp_path):
    module, path = trained
    other = Classifier(save_pretrained_bert(tmp_path / "reseeded", seed=123))
    with pytest.warns(UserWarning, match="backbone weights differ"):
        load_delta(other, path)


def test_truncated_and_pickled_files_are_refused(trained, tmp_path):
    _, path = trained
    data = path.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointReadError, match="truncated or corrupt"):
        load_delta(Classifier(trained[0].hparams.source), tmp_path / "cut.ckpt")
    torch.save({"state_dict": {}, "obj": PlainNet()}, tmp_path / "pickled.ckpt")
    with pytest.raises(CheckpointReadError, match="refuses to unpickle"):
        load_delta(PlainNet(), tmp_path / "pickled.ckpt")


def test_dtype_differences_are_cast(source, trained):
    module, path = trained
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"] = {k: v.to(torch.float64) for k, v in ckpt["state_dict"].items()}
    fresh = Classifier(source).eval()
    load_delta(fresh, ckpt)
    ids = loader().dataset.tensors[0]
    torch.testing.assert_close(fresh(ids), module(ids))


def test_setup_is_idempotent_across_stages(source, tmp_path):
    module = Classifier(source)
    callback = lora_callback()
    t = trainer(tmp_path, [callback], max_steps=1)
    t.fit(module, loader(), val_dataloaders=loader())
    t.validate(module, loader())
    t2 = trainer(tmp_path, [callback], max_steps=1)
    t2.fit(module, loader())
    assert list(DeltaModel(module.model).configs) == ["lora"]
    assert len(DeltaModel(module.model).deltas()) == 4


def test_conflicting_reattach_is_an_error(source, tmp_path):
    module = Classifier(source)
    trainer(tmp_path, [lora_callback()], max_steps=1).fit(module, loader())
    with pytest.raises(DeltaConfigError, match="already attached"):
        trainer(tmp_path, [DeltaCallback("lora", r=2)], max_steps=1).fit(module, loader())


class NoBackbone(pl.LightningModule):
    def __init__(self, n_models: int = 0):
        super().__init__()
        self.net = PlainNet()
        self.encoders = nn.ModuleList(tiny_bert() for _ in range(n_models))

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).logsumexp(-1).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(trainable_parameters(self), lr=0.1)


@pytest.mark.parametrize(("n_models", "message"), [(0, "no transformers PreTrainedModel.*'net"), (2, "several")])
def test_backbone_discovery_errors_list_candidates(tmp_path, n_models, message):
    with pytest.raises(DeltaConfigError, match=message):
        trainer(tmp_path, [DeltaCallback("lora")], max_steps=1).fit(NoBackbone(n_models), plain_loader())


def plain_loader():
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(plain_inputs(8)), batch_size=4)


def test_plain_module_named_by_path_trains_and_checkpoints(tmp_path):
    module = NoBackbone()
    original = copy.deepcopy(module.net.state_dict())
    callback = DeltaCallback("lora", targets=["embed", "conv", "body.0"], r=2, module="net", trainable="head")
    t = trainer(tmp_path, [callback], max_steps=3)
    t.fit(module, plain_loader())
    t.save_checkpoint(tmp_path / "plain.ckpt")
    keys = set(torch.load(tmp_path / "plain.ckpt", weights_only=True)["state_dict"])
    assert keys == {k for k in module.state_dict() if ".lora." in k or k.startswith("net.head.")}
    assert torch.equal(module.net.body[2].weight, original["body.2.weight"])
    fresh = NoBackbone()
    fresh.load_state_dict({f"net.{k}": v for k, v in original.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_delta(fresh, tmp_path / "plain.ckpt")
    torch.testing.assert_close(fresh.net(plain_inputs()), module.net(plain_inputs()))


def test_unknown_module_path_is_named(tmp_path):
    with pytest.raises(DeltaConfigError, match="'encoder'.*net"):
        trainer(tmp_path, [DeltaCallback("lora", module="encoder")], max_steps=1).fit(NoBackbone(), plain_loader())


def test_bad_hyperparameter_fails_at_construction():
    with pytest.raises(DeltaConfigError, match="r=0"):
        DeltaCallback("lora", r=0)


def test_bf16_backbone_has_the_same_fingerprint(source, trained):
    _, path = trained
    fresh = Classifier(source).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_delta(fresh, path)


def test_ddp_spawn_pickles_the_module_and_writes_delta_checkpoints(source, tmp_path):
    module = Classifier(source)
    t = trainer(tmp_path, [lora_callback(), ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1)],
                strategy="ddp_spawn", devices=2, max_epochs=2, enable_checkpointing=True)
    t.fit(module, loader())
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    ckpt = torch.load(path, weights_only=True)
    fresh = Classifier(source)
    load_delta(fresh, path)
    assert set(ckpt["state_dict"]) == delta_keys(fresh)
    assert all(v.abs().sum() > 0 for k, v in ckpt["state_dict"].items() if k.endswith("lora.B"))


def test_active_trains_one_task_while_a_loaded_one_waits(source, tmp_path):
    model = Classifier(source)
    handle = DeltaModel(model.model).attach(LoraConfig(r=2, name="task_a"))
    with torch.no_grad():
        for p in handle.delta_parameters():
            p.add_(0.1)
    task_a = {k: v.clone() for k, v in handle.delta_state_dict().items() if ".task_a." in k}
    assert task_a
    callback = DeltaCallback(LoraConfig(r=2, name="task_b"), trainable=["classifier"], active="task_b")
    trainer(tmp_path, [callback], max_epochs=2).fit(model, loader())
    after = handle.delta_state_dict()
    assert handle.active == ["task_b"]
    assert all(torch.equal(after[k], v) for k, v in task_a.items())  # the waiting task is untouched
    assert any(".task_b.B" in k and after[k].abs().sum() > 0 for k in after)  # task_b trained (B left zero)
    with pytest.raises(DeltaConfigError, match="no delta named \\['task_c'\\]"):
        DeltaCallback(LoraConfig(name="task_b"), active="task_c").attach(Classifier(source))


def test_load_delta_into_a_bare_backbone_that_has_a_submodule_named_like_the_recorded_path():
    from lightning_delta.checkpoint import DeltaCheckpointHooks, checkpoint_metadata
    from models import family_inputs, tiny_llama

    root = nn.Module()
    root.model = tiny_llama().eval()  # a task's `model`; LlamaForCausalLM itself has a `.model` too
    handle = DeltaModel(root.model).attach("lora", r=2).freeze_backbone()
    with torch.no_grad():
        for p in handle.delta_parameters():
            p.add_(0.1)
    DeltaCheckpointHooks.install(root, "model")
    ckpt = {"state_dict": root.state_dict(), META_KEY: checkpoint_metadata(root, "model")}
    bare = copy.deepcopy(root.model)
    DeltaModel(bare).detach()
    load_delta(bare, ckpt)
    ids = family_inputs("llama")["input_ids"]
    torch.testing.assert_close(bare(input_ids=ids).logits, root.model(input_ids=ids).logits, rtol=0, atol=0)
