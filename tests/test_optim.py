"""Parameter groups: per-method rates, LoRA+, no decay on offsets, scales, embeddings, biases and norms."""

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
