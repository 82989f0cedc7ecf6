"""BitFit: zero offsets at init, same gradients as training the biases themselves, merge."""

import copy

import pytest
import torch
from torch import nn

from lightning_delta import MergeError, attach
from models import FAMILIES, PlainNet, family_inputs, family_output, plain_inputs, tiny_bert


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_output_identical_at_init(family):
    model = FAMILIES[family]().eval()
    inputs = family_inputs(family)
    reference = family_output(model, inputs)
    handle = attach(model, "bitfit")
    assert len(handle.deltas()) > 0
    assert torch.equal(family_output(model, inputs), reference)


def test_preset_covers_every_linear_and_norm_but_the_head():
    model = tiny_bert(layers=2)
    handle = attach(model, "bitfit")
    targets = {d.target_path for d in handle.deltas()}
    linears = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.LayerNorm)) and n != "classifier"}
    assert targets == linears


def test_offset_gradient_equals_the_bias_gradient():
    """Training the offset is training the bias: the gradients are the same tensors."""
    model = tiny_bert()
    reference = copy.deepcopy(model)
    handle = attach(model, "bitfit", targets=["query", "output.LayerNorm"]).freeze_backbone()
    labels = torch.tensor([0, 1])
    model(**family_inputs("bert"), labels=labels).loss.backward()
    reference(**family_inputs("bert"), labels=labels).loss.backward()
    for d in handle.deltas():
        bias_grad = reference.get_submodule(d.target_path).bias.grad
        assert bias_grad.abs().sum() > 0
        torch.testing.assert_close(d.module.bias.grad, bias_grad, rtol=1e-5, atol=1e-7)


def test_adds_zero_bias_where_linear_has_none_and_counts_match():
    model = PlainNet(dim=16)
    handle = attach(model, "bitfit", targets=["conv", "norm", "body.0", "body.2"])
    assert model.body[2].bias is None and handle.summary().delta == 4 + 16 + 16 + 16
    assert "body.2.bias" not in model.state_dict()  # backbone names unchanged
    reference = model(plain_inputs())
    with torch.no_grad():
        model.body[2].bitfit.bias.fill_(0.5)
    assert not torch.allclose(model(plain_inputs()), reference)


def test_merge_folds_into_existing_bias_and_refuses_without_one():
    model = PlainNet().eval()
    handle = attach(model, "bitfit", targets=["conv", "norm", "body.0"])
    with torch.no_grad():
        for p in handle.delta_parameters():
            p.normal_()
    expected = model(plain_inputs())
    conv_bias = model.conv.bias.clone()
    handle.merge()
    torch.testing.assert_close(model(plain_inputs()), expected)
    assert not torch.equal(model.conv.bias, conv_bias)
    handle.unmerge()
    torch.testing.assert_close(model.conv.bias, conv_bias)

    other = PlainNet()
    h2 = attach(other, "bitfit", targets=["body.0", "body.2"])
    bias = other.body[0].bias.clone()
    with pytest.raises(MergeError, match="body.2.bitfit.*no bias"):
        h2.merge()
    assert torch.equal(other.body[0].bias, bias) and not h2.deltas()[0].module.merged  # nothing merged
