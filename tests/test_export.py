"""PEFT-format export: PeftModel.from_pretrained(base, dir) gives our attached model's outputs."""

import copy

import peft
import pytest
import torch

from lightning_delta import DeltaConfigError, attach
from lightning_delta.export import export_peft
from models import FAMILIES, family_inputs, family_output, tiny_bert, tiny_gpt2

CASES = [("lora", "bert", {"r": 4, "rslora": True}), ("lora", "gpt2", {"r": 4}), ("dora", "bert", {"r": 4}),
         ("ia3", "bert", {}), ("ia3", "llama", {}), ("prompt", "gpt2", {"num_virtual_tokens": 3}),
         ("prompt", "t5", {"num_virtual_tokens": 3}), ("prefix", "gpt2", {"num_virtual_tokens": 3}),
         ("prefix", "llama", {"num_virtual_tokens": 3}), ("prefix", "t5", {"num_virtual_tokens": 3})]


@pytest.mark.parametrize(("method", "family", "hparams"), CASES, ids=[f"{m}-{f}" for m, f, _ in CASES])
def test_peft_loads_the_export_and_gives_the_same_outputs(tmp_path, method, family, hparams):
    base = FAMILIES[family]().eval()
    model = copy.deepcopy(base)
    handle = attach(model, method, **hparams)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in handle.delta_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    export_peft(model, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    inputs = family_inputs(family)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    ours = family_output(model, inputs)
    plain = family_output(base, inputs)
    assert ours.shape != plain.shape or not torch.allclose(ours, plain, rtol=0, atol=1e-5)  # the delta matters
    torch.testing.assert_close(family_output(loaded, inputs), ours, rtol=1e-5, atol=1e-5)


def test_methods_without_a_peft_equivalent_are_refused(tmp_path):
    model = tiny_bert()
    attach(model, "adapter")
    with pytest.raises(DeltaConfigError, match="PEFT has no equivalent of 'adapter'"):
        export_peft(model, tmp_path)


def test_trainable_backbone_modules_are_not_silently_dropped(tmp_path):
    model = tiny_gpt2()
    attach(model, "lora").freeze_backbone(trainable="ln_f")
    with pytest.raises(DeltaConfigError, match="ln_f"):
        export_peft(model, tmp_path)
