"""Parameter groups: per-method rates, LoRA+, no decay on offsets, scales, embeddings, biases and norms."""

import pytest
import torch

from lightning_delta import BitFitConfig, LoraConfig, PromptConfig, attach, trainable_parameters
from lightning_delta.optim import param_groups
from models import tiny_gpt2


def group_of(groups, param):
    (group,) = [g for g in groups if any(p is param for p in g["params"])]
    return group["lr"], group["weight_decay"]


def test_groups_cover_every_trainable_parameter_once_with_the_right_settings():
    model = tiny_gpt2()
    handle = attach(model, [LoraConfig(r=2), BitFitConfig(targets=["ln_f"]), PromptConfig(num_virtual_tokens=2)])
    handle.freeze_backbone(trainable="lm_head")
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, lr_by_method={"prompt": 3e-2}, loraplus_lr_ratio=16)
    listed = [p for g in groups for p in g["params"]]
    assert len(listed) == len({id(p) for p in listed}) == len(trainable_parameters(model))
    lora = model.transformer.h[0].attn.c_attn.lora
    assert group_of(groups, lora.A) == (1e-3, 0.1)
    assert group_of(groups, lora.B) == (1.6e-2, 0.1)  # LoRA+
    assert group_of(groups, model.transformer.ln_f.bitfit.bias) == (1e-3, 0.0)
    assert group_of(groups, model.prompt.embedding) == (3e-2, 0.0)
    assert group_of(groups, model.lm_head.weight) == (1e-3, 0.1)
    torch.optim.AdamW(groups).step()  # a valid optimizer configuration


def test_without_a_rate_each_delta_trains_at_its_methods_own_and_the_head_at_the_first_deltas():
    model = tiny_gpt2()
    lora, prompt = LoraConfig(r=2), PromptConfig(num_virtual_tokens=2)
    attach(model, [lora, prompt]).freeze_backbone(trainable="lm_head")
    groups = param_groups(model)
    assert group_of(groups, model.transformer.h[0].attn.c_attn.lora.A)[0] == lora.lr
    assert group_of(groups, model.prompt.embedding)[0] == prompt.lr
    assert group_of(groups, model.lm_head.weight)[0] == lora.lr
    assert prompt.lr > 10 * lora.lr  # prompt tuning's own rate is an order of magnitude above LoRA's
    named = param_groups(model, lr_by_method={"lora": 7e-4})
    assert group_of(named, model.transformer.h[0].attn.c_attn.lora.A)[0] == 7e-4
    assert group_of(named, model.prompt.embedding)[0] == prompt.lr


def test_a_config_rate_is_the_deltas_and_a_peft_config_takes_its_native_methods():
    from lightning_delta.methods.peft_backend import PeftDeltaConfig
    from lightning_delta.optim import method_lr

    assert method_lr(LoraConfig(lr=2e-4)) == 2e-4
    assert method_lr(PeftDeltaConfig(peft={"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2,
                                           "task_type": "CAUSAL_LM"})) == PromptConfig().lr
    assert method_lr(PeftDeltaConfig(peft={"peft_type": "LORA", "r": 2, "target_modules": ["c_attn"]})) \
        == LoraConfig().lr  # not DoRA's, which shares PEFT's type
    assert method_lr(PeftDeltaConfig(peft={"peft_type": "LORA", "r": 2}, lr=1e-2)) == 1e-2


@pytest.mark.parametrize("bad", [0, -1e-3, float("nan"), True])
def test_a_bad_config_rate_is_refused_with_its_value(bad):
    from lightning_delta.errors import DeltaConfigError

    with pytest.raises(DeltaConfigError, match="lr="):
        LoraConfig(lr=bad)
