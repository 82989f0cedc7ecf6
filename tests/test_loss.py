"""The chunked causal LM loss equals each model's own loss, gradients included, with fewer bytes alive."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from lightning_delta import attach, trainable_parameters
from lightning_delta.errors import DeltaConfigError
from lightning_delta.loss import PLAIN_HEAD_MODELS, chunked_causal_lm_loss

SMALL = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "mistral": lambda: transformers.MistralConfig(**SMALL),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=8),
    "phi3": lambda: transformers.Phi3Config(**SMALL, pad_token_id=0),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, num_attention_heads=4),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64),
}


def _lm(model_type: str):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[model_type]()).eval()
    attach(model, "lora", r=4, targets="all-linear").freeze_backbone()
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.normal_(0, 0.1)  # B != 0: the deltas take part in the loss and its gradients
    return model


def _batch(vocab: int = 97):
    ids = torch.randint(1, vocab, (3, 11), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that is not trained on
    labels[2, 7:] = -100  # padding
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_every_listed_model_type_is_tested():
    assert set(CONFIGS) == PLAIN_HEAD_MODELS


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_loss_and_gradients_equal_the_models_own(model_type, chunk):
    model = _lm(model_type)
    reference = copy.deepcopy(model)
    batch = _batch()
    ours = chunked_causal_lm_loss(model, batch, chunk_size=chunk)
    theirs = reference(**batch).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    ours.backward()
    theirs.backward()
    pairs = list(zip(trainable_parameters(model), trainable_parameters(reference)))
    assert pairs
    for a, b in pairs:
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_without_grad_it_runs_no_checkpoint_and_gives_the_same_loss():
    model = _lm("llama")
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(chunked_causal_lm_loss(model, batch, 5), model(**batch).loss)


def test_only_one_chunk_of_logits_is_alive():
    from benchmarks.memory import PeakLiveBytes

    config = transformers.LlamaConfig(**{**SMALL, "vocab_size": 8000})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    attach(model, "lora", r=4, targets=["q_proj", "v_proj"]).freeze_backbone()
    batch = _batch(8000)
    batch = {k: v.repeat(4, 6) for k, v in batch.items()}  # 12 x 66 tokens: logits 3.2 MB per fp32 copy
    existing = [*model.parameters(), *model.buffers(), *batch.values()]

    def peak(loss_fn):
        with PeakLiveBytes(existing) as meter:
            loss_fn().backward()
        model.zero_grad(set_to_none=True)
        return meter.peak - sum(t.untyped_storage().nbytes() for t in existing)

    full = peak(lambda: model(**batch).loss)
    chunked = peak(lambda: chunked_causal_lm_loss(model, batch, chunk_size=64))
    logits_bytes = 12 * 66 * 8000 * 4
    assert full - chunked > 2 * logits_bytes, (full, chunked, logits_bytes)


@pytest.mark.parametrize("bad", [0, -3, 2.5, None])
def test_bad_chunk_size_is_refused(bad):
    with pytest.raises(DeltaConfigError, match=f"chunk_size={bad!r} must be a positive"):
        chunked_causal_lm_loss(_lm("llama"), _batch(), chunk_size=bad)


def test_models_that_may_change_their_logits_are_refused_with_the_fix():
    config = transformers.Gemma2Config(**{**SMALL, "head_dim": 8})
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(DeltaConfigError, match="model_type='gemma2'.*loss_chunk_size=None"):
        chunked_causal_lm_loss(model, _batch())
