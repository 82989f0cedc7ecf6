"""Every preset names modules that exist in its family as the installed transformers builds it, and
prompt tuning is refused, with what works instead, on models whose inputs are not token embeddings."""

from __future__ import annotations

import pytest
import torch

from lightning_delta import attach
from lightning_delta.errors import UnsupportedModuleError
from lightning_delta.methods.ia3 import FEEDFORWARD_DEFAULT
from lightning_delta.targets import (
    ATTENTION_OUTPUT_PRESETS,
    ATTENTION_PRESETS,
    FFN_OUTPUT_PRESETS,
    KEY_VALUE_PRESETS,
    PARALLEL_FFN_PRESETS,
    matches,
    preset,
)

TABLES = {"attention": ATTENTION_PRESETS, "attention_output": ATTENTION_OUTPUT_PRESETS,
          "ffn_output": FFN_OUTPUT_PRESETS, "parallel_ffn": PARALLEL_FFN_PRESETS, "key_value": KEY_VALUE_PRESETS}

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
         "vocab_size": 99, "max_position_embeddings": 64}
SIZES = {
    "distilbert": {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64, "vocab_size": 99},
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 99, "n_positions": 64},
    "t5": {"d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_heads": 2, "vocab_size": 99},
    "bart": {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 2,
             "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "vocab_size": 99},
    "vit": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "image_size": 8, "patch_size": 4},
    "llama": {**SMALL, "num_key_value_heads": 2}, "mistral": {**SMALL, "num_key_value_heads": 2},
    "qwen2": {**SMALL, "num_key_value_heads": 2},
}
SIZES["mt5"] = SIZES["t5"]


def build(model_type: str):
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(model_type, **SIZES.get(model_type, SMALL))
    return AutoModel.from_config(config)


FAMILY_TABLES = sorted({(kind, table) for table, presets in TABLES.items() for kind in presets})


@pytest.mark.parametrize(("kind", "table"), FAMILY_TABLES, ids=[f"{k}-{t}" for k, t in FAMILY_TABLES])
def test_every_preset_pattern_names_modules_of_its_family(kind, table):
    model = build(kind)
    names = [name for name, _ in model.named_modules()]
    patterns = preset(TABLES[table], model, "lora", table)
    for pattern in patterns:
        assert any(matches(n, pattern) for n in names), f"{kind} {table} preset {pattern!r} matches no module"


@pytest.mark.parametrize("kind", sorted(ATTENTION_PRESETS))
def test_default_lora_attaches_to_every_preset_family(kind):
    model = build(kind)
    handle = attach(model, "lora", r=2)
    assert handle.summary()  # attached somewhere: a TargetError would have been raised otherwise
    assert sum(p.numel() for n, p in model.named_parameters() if "lora" in n) > 0


@pytest.mark.parametrize("kind", sorted(FFN_OUTPUT_PRESETS))
def test_ia3_feedforward_default_covers_every_family(kind):
    names = [name for name, _ in build(kind).named_modules()]
    assert any(matches(n, p) for n in names for p in FEEDFORWARD_DEFAULT)


def test_vit_takes_lora_ia3_and_adapters_by_default():
    from transformers import ViTConfig, ViTForImageClassification

    model = ViTForImageClassification(ViTConfig(**SIZES["vit"], num_labels=3)).eval()
    pixels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = model(pixel_values=pixels).logits
    for method in ("lora", "ia3", "adapter", "parallel_adapter"):
        handle = attach(model, method)
        torch.testing.assert_close(model(pixel_values=pixels).logits, expected)  # identity at init
        handle.detach()


def test_prompt_is_refused_on_image_and_audio_models_with_what_works():
    from transformers import ViTConfig, ViTForImageClassification, WhisperConfig, WhisperForConditionalGeneration

    vit = ViTForImageClassification(ViTConfig(**SIZES["vit"]))
    whisper = WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=99, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, d_model=32,
        encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
        max_source_positions=16, max_target_positions=16))
    for model in (vit, whisper):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(UnsupportedModuleError, match=rf"{type(model).__name__}.*'lora'"):
            attach(model, "prompt", num_virtual_tokens=2)
        assert not hasattr(model, "prompt")
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
