"""Tiny models for tests: transformers families built from configs, and a plain nn.Module."""

from __future__ import annotations

import torch
from torch import nn

from lightning_delta.hf_compat import peft_finds_the_cache  # noqa: F401  (tests import it from here)


def tiny_bert(num_labels: int = 2, layers: int = 2, dropout: float = 0.0, hidden: int = 32):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=99, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=num_labels,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    return BertForSequenceClassification(config)


def tiny_gpt2(layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=99, n_embd=32, n_layer=layers, n_head=2, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def tiny_llama(layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def tiny_t5(layers: int = 2):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=99, d_model=32, d_kv=16, d_ff=64, num_layers=layers, num_heads=2,
                      dropout_rate=0.0, decoder_start_token_id=0)
    return T5ForConditionalGeneration(config)


def tiny_moe(family: str = "qwen3_moe", experts: int = 4, hidden: int = 16, expert_size: int = 12):
    """A tiny mixture-of-experts causal LM whose experts transformers stores as fused 3-D parameters:
    ``qwen3_moe`` and ``mixtral`` ``(E, out, in)``, ``gpt_oss`` ``(E, in, out)`` (``is_transposed``)."""
    import transformers

    common = dict(vocab_size=99, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64, num_experts_per_tok=2)
    config = {
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(num_experts=experts, moe_intermediate_size=expert_size,
                                                         intermediate_size=2 * hidden, head_dim=8, **common),
        "mixtral": lambda: transformers.MixtralConfig(num_local_experts=experts, intermediate_size=expert_size,
                                                      **common),
        "gpt_oss": lambda: transformers.GptOssConfig(num_local_experts=experts, intermediate_size=expert_size,
                                                     head_dim=8, layer_types=["full_attention"] * 2,
                                                     **{**common, "max_position_embeddings": 131072}),
    }[family]()
    return transformers.AutoModelForCausalLM.from_config(config)


FAMILIES = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama, "t5": tiny_t5}


def family_inputs(family: str, batch: int = 2, seq: int = 6) -> dict:
    ids = torch.randint(1, 99, (batch, seq), generator=torch.Generator().manual_seed(1))
    if family == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :4].clone()}
    return {"input_ids": ids}


def inputs_and_labels(family: str) -> tuple[dict, torch.Tensor]:
    """:func:`family_inputs` with a padded attention mask, and labels for the family's task."""
    inputs = family_inputs(family)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][1, :2] = 0  # some padding
    if family == "t5":
        return inputs, inputs.pop("decoder_input_ids")
    return inputs, (torch.tensor([0, 1]) if family == "bert" else inputs["input_ids"].clone())


def greedy_by_full_forwards(model, inputs: dict, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding that runs the whole sequence through ``model`` at every step, with no cache:
    the definition ``generate(do_sample=False)`` must match. Returns the sequences (the decoder's for
    an encoder-decoder, starting at token 0) and each step's next-token logits."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    sequence = torch.zeros(ids.shape[0], 1, dtype=torch.long) if encoder_decoder else ids
    scores = []
    with torch.no_grad():
        for _ in range(steps):
            if encoder_decoder:
                logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=sequence).logits[:, -1]
            else:
                positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: generate() numbers from the mask
                logits = model(input_ids=sequence, attention_mask=mask, position_ids=positions).logits[:, -1]
                mask = torch.cat((mask, mask.new_ones(mask.shape[0], 1)), dim=1)
            scores.append(logits)
            sequence = torch.cat((sequence, logits.argmax(-1, keepdim=True)), dim=1)
    return sequence, scores


def assert_generate_is_greedy(model, family: str, steps: int = 6):
    """``model.generate`` (with its cache) gives greedy decoding by full forwards, token for token."""
    inputs, _ = inputs_and_labels(family)
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, pad_token_id=0, output_scores=True,
                         return_dict_in_generate=True)
    sequence, scores = greedy_by_full_forwards(model, inputs, steps)
    assert torch.equal(out.sequences, sequence)
    for a, b in zip(out.scores, scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    return out


def family_output(model, inputs) -> torch.Tensor:
    return model(**inputs).logits


class PlainNet(nn.Module):
    """A model that owes nothing to transformers: embedding, conv, norm and linear layers."""

    def __init__(self, vocab: int = 50, dim: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.conv = nn.Conv2d(1, 4, kernel_size=3, padding=1)
        self.norm = nn.LayerNorm(dim)
        self.body = nn.Sequential(nn.Linear(dim * 4, dim), nn.GELU(), nn.Linear(dim, dim, bias=False))
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.embed(ids))  # (N, L, D)
        x = self.conv(x.unsqueeze(1)).mean(2)  # (N, 4, D)
        return self.head(self.body(x.flatten(1)))


def plain_inputs(batch: int = 3, seq: int = 5) -> torch.Tensor:
    return torch.randint(0, 50, (batch, seq), generator=torch.Generator().manual_seed(2))


def bundled_tokenizer():
    """The offline MiniLM's BERT tokenizer (vocab 30522), shared by every tiny model below."""
    from transformers import AutoTokenizer

    from lightning_delta.tasks.backbones import BUNDLED_MINILM, resolve_source

    return AutoTokenizer.from_pretrained(resolve_source(BUNDLED_MINILM))


def save_tiny(family: str, path, num_labels: int = 2) -> str:
    """A tiny random model of ``family`` with the bundled tokenizer, saved like a pretrained folder."""
    from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, T5Config,
                              T5ForConditionalGeneration)

    tokenizer = bundled_tokenizer()
    vocab = len(tokenizer)
    torch.manual_seed(0)
    if family == "bert":
        model = BertForSequenceClassification(BertConfig(
            vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            num_labels=num_labels, max_position_embeddings=128))
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                           bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id))
    elif family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id))
    elif family == "t5":
        model = T5ForConditionalGeneration(T5Config(
            vocab_size=vocab, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id,
            decoder_start_token_id=tokenizer.pad_token_id))
    else:
        raise ValueError(family)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
