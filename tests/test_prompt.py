"""Soft prompts equal PEFT's prompt tuning given the same embedding: forward on every family,
generate() on decoders; masks, labels and token types extended."""

import copy

import peft
import pytest
import torch

from lightning_delta import DeltaModel, attach
from models import FAMILIES, assert_generate_is_greedy, inputs_and_labels

TASKS = {"bert": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}


def pair(family, n=3):
    base = FAMILIES[family]().eval()
    model = copy.deepcopy(base)
    attach(model, "prompt", num_virtual_tokens=n)
    # PEFT prompts both T5 stacks by default; one submodule is the encoder-side prompt we implement
    extra = {"num_transformer_submodules": 1} if family == "t5" else {}
    twin = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(
        task_type=TASKS[family], num_virtual_tokens=n, **extra))
    twin.load_state_dict({"prompt_encoder.default.embedding.weight": model.prompt.embedding.detach()}, strict=False)
    return base, model, twin.eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_forward_and_loss_equal_peft(family):
    base, model, twin = pair(family)
    inputs, labels = inputs_and_labels(family)
    ours, theirs = model(**inputs, labels=labels), twin(**inputs, labels=labels)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours.loss, base(**inputs, labels=labels).loss)


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_generate_equals_greedy_decoding_of_the_peft_equal_forward(family):
    """The forward equals PEFT's (above); generate() with its cache must decode as that forward does.
    (PEFT 0.21's own generate() misses the cache under transformers 5.24's ``cache=`` name.)"""
    base, model, _ = pair(family)
    ours = assert_generate_is_greedy(model, family)
    inputs, _ = inputs_and_labels(family)
    plain = base.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
                          return_dict_in_generate=True)
    assert not torch.allclose(ours.scores[0], plain.scores[0])  # the prompt steers generation


def test_token_type_ids_and_labels_are_extended():
    model = FAMILIES["bert"]().eval()
    seen = {}
    model.bert.embeddings.register_forward_hook(lambda m, a, k, out: seen.update(k), with_kwargs=True)
    attach(model, "prompt", num_virtual_tokens=4)
    inputs, labels = inputs_and_labels("bert")
    model(**inputs, token_type_ids=torch.ones_like(inputs["input_ids"]), labels=labels)
    assert seen["inputs_embeds"].shape[1] == 4 + inputs["input_ids"].shape[1]
    assert seen["token_type_ids"][:, :4].eq(0).all() and seen["token_type_ids"][:, 4:].eq(1).all()


def test_prompt_detaches_cleanly():
    model = FAMILIES["gpt2"]().eval()
    inputs, _ = inputs_and_labels("gpt2")
    expected = model(**inputs).logits
    attach(model, "prompt")
    DeltaModel(model).detach()
    torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)
