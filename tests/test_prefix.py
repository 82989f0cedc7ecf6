"""Prefix tuning equals PEFT's given the same prefix: forward on BERT, GPT-2, Llama and T5, generate()
on GPT-2, Llama and T5; a fresh cache every forward."""

import copy

import peft
import pytest
import torch

from lightning_delta import DeltaModel, attach
from models import FAMILIES, assert_generate_is_greedy, inputs_and_labels, peft_finds_the_cache

TASKS = {"bert": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}


def peft_prefix(base, **settings):
    """PEFT's prefix tuning of a copy of ``base``: the reference (see :func:`models.peft_finds_the_cache`)."""
    return peft.get_peft_model(peft_finds_the_cache(copy.deepcopy(base)), peft.PrefixTuningConfig(**settings))


def pair(family, n=3):
    base = FAMILIES[family]().eval()
    model = copy.deepcopy(base)
    attach(model, "prefix", num_virtual_tokens=n)
    twin = peft_prefix(base, task_type=TASKS[family], num_virtual_tokens=n)
    twin.load_state_dict({"prompt_encoder.default.embedding.weight": model.prefix.embedding.detach()}, strict=False)
    return base, model, twin.eval()


@pytest.mark.parametrize("family", sorted(TASKS))
def test_forward_equals_peft_and_repeats_exactly(family):
    base, model, twin = pair(family)
    inputs, labels = inputs_and_labels(family)
    ours = model(**inputs, labels=labels)
    torch.testing.assert_close(ours.logits, twin(**inputs, labels=labels).logits, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours.loss, base(**inputs, labels=labels).loss)
    again = model(**inputs, labels=labels)  # a fresh cache: nothing accumulates between forwards
    torch.testing.assert_close(again.logits, ours.logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_generate_equals_greedy_decoding_of_the_peft_equal_forward(family):
    """The forward equals PEFT's (above); generate() with its cache must decode as that forward does.
    (PEFT 0.21's own generate() misses the cache under transformers 5.24's ``cache=`` name.)"""
    base, model, _ = pair(family)
    ours = assert_generate_is_greedy(model, family)
    inputs, _ = inputs_and_labels(family)
    plain = base.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
                          return_dict_in_generate=True)
    assert not torch.allclose(ours.scores[0], plain.scores[0])  # the prefix steers generation


def test_t5_prefix_reaches_the_decoder_self_attention_only():
    _, model, _ = pair("t5")
    inputs, labels = inputs_and_labels("t5")
    encoded = model.encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    plain = FAMILIES["t5"]().eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in plain.state_dict()})
    torch.testing.assert_close(encoded.last_hidden_state, plain.encoder(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state)


def test_prefix_detaches_cleanly():
    model = FAMILIES["bert"]().eval()
    inputs, _ = inputs_and_labels("bert")
    expected = model(**inputs).logits
    attach(model, "prefix")
    DeltaModel(model).detach()
    torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_projection_equals_peft_and_folds_to_plain_prefixes(family):
    base = FAMILIES[family]().eval()
    model = copy.deepcopy(base)
    handle = attach(model, "prefix", num_virtual_tokens=3, projection=True, projection_dim=16)
    twin = peft_prefix(base, task_type=TASKS[family], num_virtual_tokens=3, prefix_projection=True,
                       encoder_hidden_size=16)
    ours = {"embedding.weight": model.prefix.embedding, **{f"transform.{k}": v
                                                           for k, v in model.prefix.transform.state_dict().items()}}
    twin.load_state_dict({f"prompt_encoder.default.{k}": v.detach() for k, v in ours.items()}, strict=False)
    twin.eval()
    inputs, labels = inputs_and_labels(family)
    expected = twin(**inputs, labels=labels).logits
    torch.testing.assert_close(model(**inputs, labels=labels).logits, expected, rtol=1e-5, atol=1e-6)

    model.prefix.fold()
    assert model.prefix.transform is None and model.prefix.embedding.shape == (3, 2 * 2 * 32)
    torch.testing.assert_close(model(**inputs, labels=labels).logits, expected, rtol=1e-5, atol=1e-6)
    plain = copy.deepcopy(base)
    attach(plain, "prefix", num_virtual_tokens=3).freeze_backbone().load_delta_state_dict(
        DeltaModel(model).freeze_backbone().delta_state_dict())
    torch.testing.assert_close(plain(**inputs, labels=labels).logits, expected, rtol=1e-5, atol=1e-6)
    assert handle.configs["prefix"].projection is False
