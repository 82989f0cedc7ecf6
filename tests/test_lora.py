"""LoRA: identity at init, parity with PEFT, gradients, parameter counts, merge."""

import copy
import math

import peft
import pytest
import torch
from torch import nn

from lightning_delta import DeltaConfigError, LoraConfig, attach
from lightning_delta.methods.lora import LoRAEmbedding
from models import FAMILIES, PlainNet, family_inputs, family_output, plain_inputs, tiny_bert, tiny_gpt2

PLAIN_TARGETS = ["embed", "conv", "body.0", "body.2"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_output_identical_to_backbone_at_init(family):
    model = FAMILIES[family]().eval()
    inputs = family_inputs(family)
    reference = family_output(model, inputs)
    attach(model, "lora", r=4, dropout=0.1)
    assert torch.equal(family_output(model, inputs), reference)


def test_plain_module_identical_at_init():
    model = PlainNet().eval()
    reference = model(plain_inputs())
    attach(model, "lora", targets=PLAIN_TARGETS, r=2)
    assert torch.equal(model(plain_inputs()), reference)


def randomize(handle, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.delta_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def peft_twin(model, handle, targets, **kw):
    """The same backbone wrapped by PEFT's LoRA, holding our A and B."""
    cfg = next(iter(handle.configs.values()))
    twin = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=targets,
                                              use_rslora=cfg.rslora, **kw)
    )
    peft_sd = twin.state_dict()
    mapped = {}
    for d in handle.deltas():
        base = f"base_model.model.{d.target_path}"
        if isinstance(d.module, LoRAEmbedding):
            ka, kb = f"{base}.lora_embedding_A.default", f"{base}.lora_embedding_B.default"
        else:
            ka, kb = f"{base}.lora_A.default.weight", f"{base}.lora_B.default.weight"
        assert peft_sd[ka].shape == d.module.A.shape and peft_sd[kb].shape == d.module.B.shape
        mapped[ka], mapped[kb] = d.module.A.detach(), d.module.B.detach()
    twin.load_state_dict(mapped, strict=False)
    return twin.eval()


@pytest.mark.parametrize("rslora", [False, True])
def test_bert_logits_equal_peft_with_same_factors(rslora):
    base = tiny_bert().eval()
    model = copy.deepcopy(base)
    handle = attach(model, "lora", targets=["query", "value"], r=4, alpha=8, rslora=rslora)
    randomize(handle)
    twin = peft_twin(base, handle, ["query", "value"])
    inputs = family_inputs("bert")
    ours, theirs = model(**inputs).logits, twin(**inputs).logits
    assert not torch.allclose(ours, base(**inputs).logits, atol=1e-3)  # the delta matters
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_gpt2_conv1d_logits_equal_peft_with_same_factors():
    base = tiny_gpt2().eval()
    model = copy.deepcopy(base)
    handle = attach(model, "lora", targets=["c_attn", "c_proj"], r=4, alpha=4)
    randomize(handle)
    twin = peft_twin(base, handle, ["c_attn", "c_proj"], fan_in_fan_out=True)
    inputs = family_inputs("gpt2")
    assert not torch.allclose(model(**inputs).logits, base(**inputs).logits, atol=1e-3)
    torch.testing.assert_close(model(**inputs).logits, twin(**inputs).logits, rtol=1e-5, atol=1e-6)


def test_embedding_and_conv2d_equal_peft_with_same_factors():
    base = PlainNet().eval()
    model = copy.deepcopy(base)
    handle = attach(model, "lora", targets=PLAIN_TARGETS, r=2, alpha=3)
    randomize(handle)
    twin = peft_twin(base, handle, PLAIN_TARGETS)
    assert not torch.allclose(model(plain_inputs()), base(plain_inputs()), atol=1e-3)
    torch.testing.assert_close(model(plain_inputs()), twin(plain_inputs()), rtol=1e-5, atol=1e-6)


def test_gradients_reach_only_delta_parameters():
    model = tiny_bert()
    handle = attach(model, "lora", r=4).freeze_backbone()
    model(**family_inputs("bert"), labels=torch.tensor([0, 1])).loss.backward()
    delta = {id(p) for p in handle.delta_parameters()}
    for name, p in model.named_parameters():
        if id(p) in delta:
            assert p.grad is not None, name
        else:
            assert p.grad is None and not p.requires_grad, name
    # B starts at zero, so A's first gradient is zero but B's is not
    assert any(p.grad.abs().sum() > 0 for p in handle.delta_parameters())


def test_parameter_count_matches_formula():
    model = tiny_bert(layers=3, hidden=32)
    r = 4
    handle = attach(model, "lora", targets=["query", "value", "intermediate.dense"], r=r)
    hidden, inter, layers = 32, 64, 3
    expected = layers * (2 * r * (hidden + hidden) + r * (hidden + inter))
    assert handle.summary().delta == expected


def test_plain_parameter_count_matches_formula():
    model = PlainNet(vocab=50, dim=16)
    handle = attach(model, "lora", targets=PLAIN_TARGETS, r=2)
    expected = 2 * (50 + 16) + 2 * (1 * 3 * 3) + 4 * 2 + 2 * (64 + 16) + 2 * (16 + 16)
    assert handle.summary().delta == expected


@pytest.mark.parametrize("targets", [["query", "value"], ["embeddings.word_embeddings", "dense"]])
def test_merge_then_unmerge(targets):
    model = tiny_bert().eval()
    inputs = family_inputs("bert")
    base_out = model(**inputs).logits
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    handle = attach(model, "lora", targets=targets, r=4)
    randomize(handle)
    unmerged = model(**inputs).logits
    assert not torch.allclose(unmerged, base_out, atol=1e-3)
    handle.merge()
    assert handle.merged
    assert any(not torch.equal(model.state_dict()[k], weights[k]) for k in weights)
    torch.testing.assert_close(model(**inputs).logits, unmerged, rtol=1e-5, atol=1e-5)
    handle.unmerge()
    assert not handle.merged
    for k, v in weights.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(**inputs).logits, unmerged, rtol=1e-6, atol=1e-6)


def test_merge_conv2d_and_conv1d():
    for model, targets, run in [
        (PlainNet().eval(), PLAIN_TARGETS, lambda m: m(plain_inputs())),
        (tiny_gpt2().eval(), ["c_attn", "c_fc"], lambda m: m(**family_inputs("gpt2")).logits),
    ]:
        handle = attach(model, "lora", targets=targets, r=2)
        randomize(handle)
        expected = run(model)
        handle.merge()
        torch.testing.assert_close(run(model), expected, rtol=1e-5, atol=1e-5)


def test_scale_follows_alpha_over_r_and_rslora():
    assert LoraConfig(r=8, alpha=16).scale == 2.0
    assert LoraConfig(r=16, alpha=8, rslora=True).scale == pytest.approx(8 / math.sqrt(16))


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [({"r": 0}, "r=0"), ({"r": -2}, "r=-2"), ({"r": 2.5}, "r=2.5"), ({"dropout": 1.0}, "dropout=1.0"),
     ({"dropout": -0.1}, "dropout=-0.1"), ({"alpha": 0}, "alpha=0"), ({"rank": 4}, "'rank'")],
)
def test_bad_hyperparameters_are_named(kwargs, bad):
    model = tiny_bert()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(DeltaConfigError) as err:
        attach(model, "lora", **kwargs)
    assert bad in str(err.value)
    assert list(model.state_dict()) == list(before)


def test_unknown_method_lists_known_ones():
    with pytest.raises(DeltaConfigError, match="'lorra'.*bitfit.*lora"):
        attach(tiny_bert(), "lorra")


def test_delta_stays_fp32_under_a_half_precision_backbone():
    model = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    handle = attach(model, "lora", targets="0", r=2)
    randomize(handle)
    assert all(p.dtype == torch.float32 for p in handle.delta_parameters())
    out = model(torch.randn(3, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
