"""The DeltaModel handle: several deltas, detach, state round trips, pickling, deepcopy, compile."""

import copy
import io
import pickle

import pytest
import torch

from lightning_delta import (
    BitFitConfig,
    DeltaConfigError,
    DeltaError,
    DeltaModel,
    DeltaStateError,
    LoraConfig,
    TargetError,
    attach,
)
from models import PlainNet, family_inputs, plain_inputs, tiny_bert, tiny_gpt2


def randomize(handle, seed=5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.delta_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return handle


def logits(model):
    return model(**family_inputs("bert")).logits


def test_key_scheme_puts_each_delta_under_its_target():
    model = tiny_bert()
    attach(model, "lora", targets="query", r=2)
    keys = [k for k in model.state_dict() if ".lora." in k]
    assert keys[:2] == ["bert.encoder.layer.0.attention.self.query.lora.A",
                        "bert.encoder.layer.0.attention.self.query.lora.B"]


def test_backbone_names_unchanged_so_a_stock_state_dict_still_loads():
    model = tiny_bert()
    stock = copy.deepcopy(model.state_dict())
    handle = attach(model, "lora", r=2).freeze_backbone()
    missing, unexpected = model.load_state_dict(stock, strict=False)
    assert unexpected == [] and set(missing) == set(handle.delta_state_dict())


def test_two_deltas_on_one_target_and_detaching_one_keeps_the_other():
    model = tiny_bert().eval()
    base = logits(model)
    handle = randomize(attach(model, [LoraConfig(r=2, targets=["query"]), BitFitConfig(targets=["query"])]))
    both = logits(model)
    lora_only = copy.deepcopy(model)
    DeltaModel(lora_only).detach("bitfit")
    assert set(DeltaModel(lora_only).configs) == {"lora"}
    assert not torch.allclose(logits(lora_only), both) and not torch.allclose(logits(lora_only), base)
    handle.detach("lora")
    handle.detach("bitfit")
    torch.testing.assert_close(logits(model), base, rtol=0, atol=0)


def test_second_delta_of_a_method_gets_its_own_name_and_explicit_clash_is_an_error():
    model = tiny_bert()
    attach(model, "lora", r=2)
    handle = attach(model, "lora", r=4)
    assert list(handle.configs) == ["lora", "lora_2"]
    with pytest.raises(DeltaConfigError, match="'lora_2' is already attached"):
        attach(model, "lora", name="lora_2")


def test_detach_restores_names_values_and_outputs_exactly():
    model = tiny_bert().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = logits(model)
    handle = randomize(attach(model, "lora", r=2))
    handle.merge()  # detach unmerges first
    handle.detach()
    after = model.state_dict()
    assert list(after) == list(before)
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model), base, rtol=1e-6, atol=1e-6)
    assert all(not m._forward_hooks for m in model.modules())


def test_detaching_an_unknown_delta_names_the_attached_ones():
    model = tiny_bert()
    attach(model, "lora")
    with pytest.raises(DeltaError, match="'adapter'.*'lora'"):
        DeltaModel(model).detach("adapter")


def test_failed_attach_of_a_list_leaves_the_model_unchanged():
    model = tiny_bert()
    keys = list(model.state_dict())
    with pytest.raises(TargetError):
        attach(model, [LoraConfig(targets=["query"]), BitFitConfig(targets=["nope"])])
    assert list(model.state_dict()) == keys and not DeltaModel(model).deltas()


def test_delta_state_dict_round_trip_with_dtype_cast():
    model = tiny_bert()
    handle = randomize(attach(model, "lora", r=2).freeze_backbone(trainable=["classifier"]))
    state = handle.delta_state_dict()
    assert all(".lora." in k or k.startswith("classifier.") for k in state)
    assert {"classifier.weight", "classifier.bias"} <= set(state)
    other = tiny_bert()
    other.load_state_dict({k: v for k, v in model.state_dict().items() if k in other.state_dict()})
    other_handle = attach(other, "lora", r=2).freeze_backbone(trainable=["classifier"])
    other_handle.load_delta_state_dict({k: v.to(torch.float64) for k, v in state.items()})
    torch.testing.assert_close(logits(other.eval()), logits(model.eval()))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.pop(next(iter(s))), "lacks 1 delta"),
        (lambda s: s.update({"bert.encoder.layer.9.attention.self.query.lora.A": torch.zeros(2, 32)}), "no place"),
        (lambda s: s.update({k: torch.zeros(3, 32) for k in list(s)[:1]}), "differ in shape"),
        (lambda s: s.update({"bert.embeddings.word_embeddings.weight": torch.zeros(99, 32)}), "full checkpoint"),
    ],
)
def test_bad_delta_state_is_refused_before_anything_is_loaded(mutate, message):
    model = tiny_bert()
    handle = randomize(attach(model, "lora", r=2).freeze_backbone())
    state = {k: v.clone() for k, v in handle.delta_state_dict().items()}
    mutate(state)
    before = {k: v.clone() for k, v in handle.delta_state_dict().items()}
    with pytest.raises(DeltaStateError, match=message):
        handle.load_delta_state_dict(state)
    for k, v in handle.delta_state_dict().items():
        assert torch.equal(v, before[k])


def test_non_strict_load_keeps_missing_deltas_at_init():
    model = tiny_bert()
    handle = attach(model, "lora", r=2).freeze_backbone()
    state = handle.delta_state_dict()
    state.pop("bert.encoder.layer.1.attention.self.value.lora.A")
    handle.load_delta_state_dict(state, strict=False)


def test_freeze_backbone_with_unknown_trainable_pattern_is_an_error():
    with pytest.raises(TargetError, match="'clasifier'"):
        attach(tiny_bert(), "lora").freeze_backbone(trainable=["clasifier"])


def test_summary_counts():
    model = tiny_bert()
    handle = attach(model, "lora", r=2).freeze_backbone(trainable="classifier")
    summary = handle.summary()
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.classifier.parameters())
    assert summary.total == total and summary.trainable == summary.delta + head
    assert "%" in str(summary) and f"{summary.delta:,}" in str(summary)


@pytest.mark.parametrize("copier", ["pickle", "deepcopy", "torch.save"])
def test_attached_model_survives_pickle_deepcopy_and_save(copier):
    model = tiny_gpt2().eval()
    handle = randomize(attach(model, "lora", r=2))
    expected = model(**family_inputs("gpt2")).logits
    if copier == "pickle":
        clone = pickle.loads(pickle.dumps(model))
    elif copier == "deepcopy":
        clone = copy.deepcopy(model)
    else:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        clone = torch.load(buf, weights_only=False)
    torch.testing.assert_close(clone(**family_inputs("gpt2")).logits, expected)
    # the copy's hooks are bound to the copy's deltas, not the original's
    clone_handle = DeltaModel(clone)
    with torch.no_grad():
        for p in clone_handle.delta_parameters():
            p.zero_()
    assert torch.allclose(model(**family_inputs("gpt2")).logits, expected)
    assert not torch.allclose(clone(**family_inputs("gpt2")).logits, expected)
    assert len(handle.deltas()) == len(clone_handle.deltas())


def test_attached_model_compiles():
    model = PlainNet().eval()
    handle = randomize(attach(model, "lora", targets=["embed", "conv", "body.0"], r=2))
    expected = model(plain_inputs())
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(plain_inputs()), expected)
    handle.merge()
    torch.testing.assert_close(compiled(plain_inputs()), expected, rtol=1e-5, atol=1e-5)


def test_engine_imports_neither_lightning_nor_transformers():
    import subprocess
    import sys

    code = (
        "import sys, torch, lightning_delta as ld\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 4))\n"
        "ld.attach(m, 'lora', targets='0', r=2).freeze_backbone()\n"
        "print(sorted(k for k in ('lightning', 'transformers') if k in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_attach_on_the_meta_device_allocates_nothing():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                             num_attention_heads=4, num_key_value_heads=4, vocab_size=128))
    handle = attach(model, "lora", r=8).freeze_backbone()
    assert handle.summary().delta == 4 * 2 * 8 * (256 + 256)
    assert all(p.device.type == "meta" for p in handle.delta_parameters())


def test_summary_reports_adam_state():
    handle = attach(tiny_bert(), "lora", r=2).freeze_backbone()
    assert handle.summary().adam_state_bytes == 8 * handle.summary().trainable
    assert "AdamW state" in str(handle.summary())
