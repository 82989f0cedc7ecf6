"""FSDP1 needs uniform dtype and requires_grad per flat parameter: the delta wrap policy guarantees it.

FSDPStrategy refuses the CPU, so the policy is checked here on the units it would choose; the
GPU run is for machines that have one.
"""

import functools

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy, lambda_auto_wrap_policy

from lightning_delta import attach
from lightning_delta.distributed import delta_wrap_policy, flat_groups, install_wrap_policy, repeated_blocks
from models import tiny_bert, tiny_llama


def wraps(policy):
    return lambda module: policy(module=module, recurse=False, nonwrapped_numel=0)


def uniform(groups):
    return all(len({(p.dtype, p.requires_grad) for p in params}) == 1 for params in groups.values())


@pytest.mark.parametrize("build", [tiny_llama, tiny_bert])
def test_delta_units_make_every_flat_parameter_uniform(build):
    model = build()
    head = "classifier" if build is tiny_bert else "lm_head"
    attach(model, "lora", r=2).freeze_backbone(trainable=[head])
    model.to(torch.bfloat16)  # frozen bf16, deltas stay fp32
    for p in model.get_submodule(head).parameters():
        p.data = p.data.float()  # as keep_trainable_fp32 does under bf16-true
    blocks = {type(b) for b in repeated_blocks(model)}
    assert blocks and len(repeated_blocks(model)) == 2
    groups = flat_groups(model, wraps(delta_wrap_policy(blocks)))
    assert uniform(groups)
    assert sum(1 for unit in groups if unit.endswith(".lora")) == 4 and head in groups
    # the same blocks without delta units would mix fp32 trainable and bf16 frozen tensors
    only_blocks = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: isinstance(m, tuple(blocks)))
    assert not uniform(flat_groups(model, wraps(only_blocks)))


def test_callback_installs_the_policy_and_keeps_the_users():
    model = tiny_llama()
    attach(model, "lora", r=2)
    strategy = FSDPStrategy()
    install_wrap_policy(strategy, model)
    assert uniform(flat_groups(model.to(torch.bfloat16), wraps(strategy.kwargs["auto_wrap_policy"])))

    layer = type(repeated_blocks(model)[0])
    user = FSDPStrategy(auto_wrap_policy={layer}, use_orig_params=False)
    install_wrap_policy(user, model)
    install_wrap_policy(user, model)  # idempotent
    combined = wraps(user.kwargs["auto_wrap_policy"])
    assert combined(repeated_blocks(model)[0]) and combined(model.model.layers[0].self_attn.q_proj.lora)
    assert isinstance(user.kwargs["auto_wrap_policy"].keywords["policies"][0], ModuleWrapPolicy)
