"""A few CPU Trainer steps per model family with nothing but DeltaCallback: loss falls, only deltas move."""

import copy

import pytest
import torch

from lightning_delta import DeltaCallback, DeltaModel
from lightning_helpers import LanguageModel, trainer
from models import FAMILIES


@pytest.mark.parametrize("method", ["lora", "bitfit"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_with_callback_only(tmp_path, family, method):
    module = LanguageModel(family)
    module.losses = []
    backbone = copy.deepcopy(module.model.state_dict())
    trainer(tmp_path, [DeltaCallback(method)], max_steps=12).fit(module)
    assert module.losses[-1] < module.losses[0]
    after = module.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in backbone.items())
    assert DeltaModel(module.model).summary().trainable == DeltaModel(module.model).summary().delta
