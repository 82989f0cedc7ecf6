"""The PEFT backend: any PEFT method under lightning_delta's freezing, delta-only checkpoints and resume."""

import copy

import peft
import pytest
import torch

from lightning_delta import DeltaCallback, DeltaConfigError, DeltaModel, attach, load_delta
from lightning_delta.methods import peft_backend
from lightning_helpers import Classifier, loader, save_pretrained_bert, trainer
from models import family_inputs, tiny_bert


def test_injected_adapter_equals_peft_model_and_only_it_trains():
    base = tiny_bert().eval()
    config = peft.LoHaConfig(r=2, target_modules=["query", "value"])
    model = copy.deepcopy(base)
    handle = attach(model, peft_config=config).freeze_backbone()
    twin = peft.get_peft_model(copy.deepcopy(base), config, adapter_name="peft")  # the delta's name
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in handle.delta_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    mapped = {f"base_model.model.{k}": v for k, v in handle.delta_state_dict().items()}
    assert set(mapped) <= set(twin.state_dict())
    twin.load_state_dict(mapped, strict=False)
    inputs = family_inputs("bert")
    assert not torch.allclose(model(**inputs).logits, base(**inputs).logits, atol=1e-6)
    torch.testing.assert_close(model(**inputs).logits, twin.eval()(**inputs).logits, rtol=1e-5, atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("hada_" in n for n in trainable)
    assert set(handle.delta_state_dict()) == trainable


def test_detach_unwraps_the_peft_layers():
    model = tiny_bert().eval()
    names = list(model.state_dict())
    expected = model(**family_inputs("bert")).logits
    handle = attach(model, peft_config=peft.LoraConfig(r=2, target_modules=["query"]))
    assert any(".base_layer." in k for k in model.state_dict())
    handle.detach()
    assert list(model.state_dict()) == names
    torch.testing.assert_close(model(**family_inputs("bert")).logits, expected, rtol=0, atol=0)


def test_callback_trains_checkpoints_only_the_adapter_and_reloads(tmp_path):
    source = save_pretrained_bert(tmp_path / "bert")
    config = peft.IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"])
    module = Classifier(source)
    t = trainer(tmp_path, [DeltaCallback(peft_config=config, trainable="classifier")], max_steps=3)
    t.fit(module, loader())
    t.save_checkpoint(tmp_path / "ia3.ckpt")
    state = torch.load(tmp_path / "ia3.ckpt", weights_only=True)["state_dict"]
    assert state and all(".ia3_l." in k or k.startswith("model.classifier.") for k in state)
    fresh = Classifier(source).eval()
    load_delta(fresh, tmp_path / "ia3.ckpt")  # re-injects from the recorded PEFT config
    ids = loader().dataset.tensors[0]
    torch.testing.assert_close(fresh(ids), module.eval()(ids))


def test_missing_peft_says_how_to_install(monkeypatch):
    monkeypatch.setattr(peft_backend.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DeltaConfigError, match=r"pip install \"lightning-delta\[peft\]\""):
        attach(tiny_bert(), peft_config=peft.LoraConfig(r=2, target_modules=["query"]))


def test_peft_config_and_method_together_is_refused():
    with pytest.raises(DeltaConfigError, match="replaces method"):
        attach(tiny_bert(), "lora", peft_config=peft.LoraConfig(r=2, target_modules=["query"]))
    assert DeltaModel(tiny_bert()).deltas() == []


def test_set_active_refuses_to_switch_a_peft_backend_delta_and_changes_nothing():
    model = tiny_bert().eval()
    handle = attach(model, peft_config=peft.LoraConfig(r=2, target_modules=["query"]))
    handle.attach("ia3")
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(DeltaConfigError, match=r"does not switch \['peft'\] deltas \['peft'\]"):
        handle.set_active("ia3")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
