"""PEFT round trips on the families and layouts the method tests do not use: prompt/prefix heads on
sequence classifiers (BERT, RoBERTa, DeBERTa-v2), RoBERTa's two-module head, encoder-decoder prompt
learning saved with PEFT's defaults, and adapters imported through the PEFT backend exported back.
PEFT 0.21 is the reference everywhere (``PeftModel.from_pretrained`` on the same base)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

from lightning_delta import attach
from lightning_delta.peft_format import export_peft, import_peft, peft_methods
from models import family_inputs, family_output, inputs_and_labels, peft_finds_the_cache, tiny_bert, tiny_t5

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
         "vocab_size": 99, "max_position_embeddings": 64, "type_vocab_size": 2, "num_labels": 3,
         "pad_token_id": 0}


def classifier(kind: str):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if kind == "bert":
        return tiny_bert(num_labels=3).eval()
    config = AutoConfig.for_model(kind, **SMALL, **({"pooler_hidden_size": 32} if kind == "deberta-v2" else {}))
    return AutoModelForSequenceClassification.from_config(config).eval()


def perturb(parameters, scale: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in parameters:
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def inputs() -> dict:
    batch = family_inputs("bert")
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    return batch


def peft_reference(base, directory):
    return peft.PeftModel.from_pretrained(peft_finds_the_cache(copy.deepcopy(base)), str(directory)).eval()


KINDS = ["bert", "roberta", "deberta-v2"]


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_on_a_classifier_exports_its_head_where_peft_reads_it(tmp_path, kind):
    base = classifier(kind)
    model = copy.deepcopy(base)
    attach(model, "prompt", num_virtual_tokens=3).freeze_backbone(trainable=["classifier"])
    perturb([p for p in model.parameters() if p.requires_grad])
    export_peft(model, tmp_path)
    loaded = peft_reference(base, tmp_path)
    ours = family_output(model, inputs())
    assert not torch.allclose(ours, family_output(base, inputs()), atol=1e-3)
    torch.testing.assert_close(family_output(loaded, inputs()), ours, rtol=1e-5, atol=1e-5)


# DeBERTa-v2 takes no key/value cache: prefix tuning does not apply there (PEFT's nor ours)
PROMPT_LEARNING = [(k, "prompt") for k in KINDS] + [("bert", "prefix"), ("roberta", "prefix")]


@pytest.mark.parametrize(("kind", "method"), PROMPT_LEARNING, ids=[f"{k}-{m}" for k, m in PROMPT_LEARNING])
def test_peft_prompt_learning_classifier_imports_with_its_head(tmp_path, kind, method):
    base = classifier(kind)
    make = {"prompt": peft.PromptTuningConfig, "prefix": peft.PrefixTuningConfig}[method]
    trained = peft.get_peft_model(peft_finds_the_cache(copy.deepcopy(base)),
                                  make(task_type="SEQ_CLS", num_virtual_tokens=3))
    perturb([p for p in trained.parameters() if p.requires_grad])
    trained.save_pretrained(str(tmp_path))
    expected = family_output(peft_reference(base, tmp_path), inputs())

    model = copy.deepcopy(base)
    handle = import_peft(model, tmp_path)
    torch.testing.assert_close(family_output(model, inputs()), expected, rtol=1e-5, atol=1e-5)
    assert {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("classifier")}, \
        "the head PEFT trained stays trainable"
    # and back: the re-export loads in PEFT to the same outputs
    export_peft(model, tmp_path / "again")
    torch.testing.assert_close(family_output(peft_reference(base, tmp_path / "again"), inputs()), expected,
                               rtol=1e-5, atol=1e-5)
    assert handle.configs


def test_reexport_of_roberta_two_module_head_lists_the_head_once(tmp_path):
    import json

    base = classifier("roberta")
    trained = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))
    perturb([p for p in trained.parameters() if p.requires_grad])
    trained.save_pretrained(str(tmp_path / "adapter"))
    expected = family_output(peft_reference(base, tmp_path / "adapter"), inputs())

    model = copy.deepcopy(base)
    import_peft(model, tmp_path / "adapter")
    export_peft(model, tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "adapter_config.json").read_text())["modules_to_save"]
    assert saved == ["classifier"], saved
    torch.testing.assert_close(family_output(peft_reference(base, tmp_path / "again"), inputs()), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_encoder_decoder_prompt_learning_saved_with_peft_defaults_imports_exactly(tmp_path, method):
    import json

    base = tiny_t5().eval()
    make = {"prompt": peft.PromptTuningConfig, "prefix": peft.PrefixTuningConfig}[method]
    trained = peft.get_peft_model(copy.deepcopy(base), make(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3))
    perturb([p for p in trained.parameters() if p.requires_grad])
    trained.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["num_transformer_submodules"] == 2
    batch, labels = inputs_and_labels("t5")
    expected = peft_reference(base, tmp_path)(**batch, labels=labels).logits

    model = copy.deepcopy(base)
    import_peft(model, tmp_path)
    assert not torch.allclose(base(**batch, labels=labels).logits, expected, atol=1e-3)
    torch.testing.assert_close(model(**batch, labels=labels).logits, expected, rtol=1e-5, atol=1e-5)


def test_prompt_embeddings_of_the_wrong_shape_are_refused(tmp_path):
    from safetensors.torch import save_file

    from lightning_delta.errors import DeltaStateError

    base = tiny_t5().eval()
    peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3)).save_pretrained(str(tmp_path))
    save_file({"prompt_embeddings": torch.zeros(5, 32)}, str(tmp_path / "adapter_model.safetensors"))
    model = copy.deepcopy(base)
    with pytest.raises(DeltaStateError, match=r"\(5, 32\).*\(3, 32\)"):
        import_peft(model, tmp_path)
    assert not hasattr(model, "prompt")


@pytest.mark.parametrize("make", [
    lambda: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["query"]),
    lambda: peft.HRAConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"),
], ids=["adalora", "hra-cls"])
def test_adapter_imported_through_peft_exports_back_in_its_own_format(tmp_path, make):
    base = tiny_bert().eval()
    trained = peft.get_peft_model(copy.deepcopy(base), make())
    perturb([p for p in trained.parameters() if p.requires_grad], 0.5)
    trained.save_pretrained(str(tmp_path / "adapter"))
    expected = family_output(peft_reference(base, tmp_path / "adapter"), inputs())
    assert not torch.allclose(family_output(base, inputs()), expected, atol=1e-5)

    model = copy.deepcopy(base)
    handle = import_peft(model, tmp_path / "adapter")
    assert next(iter(handle.configs.values())).method == "peft"
    export_peft(model, tmp_path / "again")
    torch.testing.assert_close(family_output(peft_reference(base, tmp_path / "again"), inputs()), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", [m for m in peft_methods() if m != "peft"])  # "peft": PEFT's own config
def test_every_exported_method_reads_back_as_itself(tmp_path, method):
    """Each registered method that writes PEFT's format is the one method that reads it back (LoRA and DoRA
    share PEFT's "LORA" and are told apart by ``use_dora``); a method with no ``peft_type`` is left to PEFT."""
    import json

    from lightning_delta.methods import METHODS, peft_reader

    model = tiny_bert()
    attach(model, method).freeze_backbone(trainable="classifier")
    export_peft(model, tmp_path)
    settings = json.loads((tmp_path / "adapter_config.json").read_text())
    cls = METHODS[method]
    assert peft_reader(settings) is (cls if cls.peft_type else None)
    readers = [name for name, other in METHODS.items() if other.reads_peft(settings)]
    assert readers == ([method] if cls.peft_type else [])
