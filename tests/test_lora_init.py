"""LoRA initialisations: default, gaussian, PiSSA and OLoRA (identity, PEFT parity, detach, merge,
delta-only checkpoints and PEFT export relative to the original weights)."""

import copy
import warnings

import peft
import pytest
import torch
from lightning_helpers import Classifier, ReloadableClassifier, loader, save_pretrained_bert, trainer
from models import PlainNet, family_inputs, tiny_bert, tiny_gpt2
from torch import nn

from lightning_delta import (
    DeltaCallback,
    DeltaConfigError,
    DeltaModel,
    LoraConfig,
    UnsupportedModuleError,
    attach,
    load_delta,
    save_delta,
)
from lightning_delta.fingerprint import compare_fingerprint, fingerprint
from lightning_delta.peft_format import export_peft

INITS = ["default", "gaussian", "pissa", "olora"]
BERT_TARGETS = ["query", "value", "intermediate.dense"]
# PEFT's OLoRA does not transpose Conv1D weights (its factors only fit square ones): compared on Linear only
PEFT_CASES = [("pissa", "bert"), ("olora", "bert"), ("pissa", "gpt2")]
FAMILY = {"bert": (tiny_bert, BERT_TARGETS, {}), "gpt2": (tiny_gpt2, ["c_attn", "c_fc"], {"fan_in_fan_out": True})}


def logits(model, family="bert"):
    with torch.no_grad():
        return model(**family_inputs(family)).logits


def perturb(handle, seed=5, size=0.05):
    """Training-like steps: small changes to A and B."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.delta_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * size)


def test_unknown_init_is_named_with_the_valid_ones():
    with pytest.raises(DeltaConfigError, match=r"init='svd'.*'default', 'gaussian', 'pissa', 'olora'"):
        LoraConfig(init="svd")
    with pytest.raises(DeltaConfigError, match="init='pissa'"):
        attach(tiny_bert(), "dora", init="pissa")


def test_residual_inits_refuse_embeddings_convs_and_too_large_ranks():
    model = PlainNet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportedModuleError, match="Embedding"):
        attach(model, "lora", targets=["body.0", "embed"], init="pissa", r=2)
    with pytest.raises(UnsupportedModuleError, match="r <= min"):
        attach(model, "lora", targets=["body.2"], init="olora", r=17)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not DeltaModel(model).deltas()


@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize("init", INITS)
def test_attached_model_computes_what_the_backbone_did(init, family):
    make, targets, _ = FAMILY[family]
    model = make().eval()
    reference = logits(model, family)
    handle = attach(model, "lora", targets=targets, r=4, alpha=8, init=init)
    out = logits(model, family)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    if init in ("default", "gaussian"):
        assert torch.equal(out, reference)
        assert all(d.module.B.abs().sum() == 0 for d in handle.deltas())
    else:  # a non-zero start, the residual in the frozen weight
        assert all(d.module.B.abs().sum() > 0 for d in handle.deltas())


def test_gaussian_draws_std_one_over_r_from_the_seed():
    one, two = tiny_bert(hidden=64), tiny_bert(hidden=64)
    first = attach(one, "lora", targets=BERT_TARGETS, r=8, init="gaussian")
    second = attach(two, LoraConfig(targets=BERT_TARGETS, r=8, init="gaussian"))
    values = torch.cat([d.module.A.flatten() for d in first.deltas()])
    assert abs(values.std().item() - 1 / 8) < 0.01 and abs(values.mean().item()) < 0.01
    for a, b in zip(first.deltas(), second.deltas(), strict=True):
        assert torch.equal(a.module.A, b.module.A)
    default = attach(tiny_bert(hidden=64), "lora", targets=BERT_TARGETS, r=8)
    assert not torch.equal(default.deltas()[0].module.A, first.deltas()[0].module.A)


@pytest.mark.parametrize(("init", "family"), PEFT_CASES)
def test_factors_and_residual_equal_peft(init, family):
    make, targets, kw = FAMILY[family]
    base = make().eval()
    model = copy.deepcopy(base)
    handle = attach(model, "lora", targets=targets, r=4, alpha=8, init=init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init, **kw)).eval()
    theirs = twin.state_dict()
    worst = 0.0
    for d in handle.deltas():
        prefix = f"base_model.model.{d.target_path}"
        pairs = [(d.module.A, theirs[f"{prefix}.lora_A.default.weight"]),
                 (d.module.B, theirs[f"{prefix}.lora_B.default.weight"]),
                 (model.get_submodule(d.target_path).weight, theirs[f"{prefix}.base_layer.weight"])]
        for ours, peft_value in pairs:
            assert ours.shape == peft_value.shape
            worst = max(worst, (ours - peft_value).abs().max().item())
    assert worst <= 1e-6
    torch.testing.assert_close(logits(model, family), logits(twin, family), rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", INITS)
def test_detach_restores_the_original_weights(init):
    model = tiny_bert().eval()
    original = copy.deepcopy(model.state_dict())
    reference = logits(model)
    handle = attach(model, "lora", targets=BERT_TARGETS, r=4, init=init)
    perturb(handle)
    if init in ("pissa", "olora"):
        changed = [k for k in original if not torch.equal(model.state_dict()[k], original[k])]
        assert changed and all(k.endswith(".weight") for k in changed)  # the residuals
    handle.merge()  # detach unmerges first
    handle.detach()
    assert list(model.state_dict()) == list(original)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model), reference, rtol=0, atol=1e-5)


def test_detach_in_any_order_restores_stacked_residuals():
    model = tiny_bert().eval()
    original = copy.deepcopy(model.state_dict())
    handle = attach(model, [LoraConfig(targets=["query"], r=2, init="pissa"),
                            LoraConfig(targets=["query", "value"], r=3, init="olora", name="second")])
    handle.detach("lora")
    handle.detach("second")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("init", ["gaussian", "pissa", "olora"])
def test_merge_and_unmerge(init):
    model = tiny_bert().eval()
    handle = attach(model, "lora", targets=BERT_TARGETS, r=4, init=init)
    perturb(handle)
    residual = copy.deepcopy(model.state_dict())
    unmerged = logits(model)
    handle.merge()
    torch.testing.assert_close(logits(model), unmerged, rtol=0, atol=1e-5)
    handle.unmerge()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, residual[key], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model), unmerged, rtol=0, atol=1e-6)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_fingerprint_describes_the_original_weights(init):
    base = tiny_bert().eval().requires_grad_(False)  # values are sampled from frozen tensors only
    model = copy.deepcopy(base)
    handle = attach(model, "lora", targets="all-linear", r=4, init=init).freeze_backbone()
    ours, plain = fingerprint(model), fingerprint(base)
    targeted = {f"{d.target_path}.weight" for d in handle.deltas()}
    assert targeted & set(plain["samples"])  # a residual weight is among the sampled ones
    assert ours["samples"].keys() == plain["samples"].keys()
    for key, values in plain["samples"].items():
        assert ours["samples"][key] == pytest.approx(values, abs=1e-6), key
    assert compare_fingerprint(ours, copy.deepcopy(base)) == []  # a fresh backbone: no warning
    assert compare_fingerprint(plain, model) == []  # the attached model: no warning


@pytest.mark.parametrize("init", ["pissa", "olora", "gaussian"])
def test_save_fresh_backbone_load_round_trip(tmp_path, init):
    base = tiny_bert().eval()
    model = copy.deepcopy(base)
    handle = attach(model, "lora", targets="all-linear", r=4, init=init).freeze_backbone()
    perturb(handle)
    expected = logits(model)
    save_delta(model, tmp_path / "delta")
    fresh = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fingerprint warning
        loaded = DeltaModel(load_delta(fresh, tmp_path / "delta"))
    assert torch.equal(logits(fresh), expected)
    for key, value in model.state_dict().items():  # residual weights recomputed identically
        assert torch.equal(fresh.state_dict()[key], value), key
    loaded.detach()
    for key, value in base.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=1e-6)


def test_lightning_checkpoint_reload_and_resume_with_pissa(tmp_path):
    source = save_pretrained_bert(tmp_path / "bert")
    module = Classifier(source)
    callback = DeltaCallback(LoraConfig(r=4, targets="all-linear", init="pissa"), trainable=["classifier"])
    fit = trainer(tmp_path, [callback], max_steps=4, max_epochs=-1)
    fit.fit(module, loader())
    fit.save_checkpoint(tmp_path / "delta.ckpt")
    ids = loader().dataset.tensors[0]
    module.eval()
    with torch.no_grad():
        expected = module(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        reloaded = ReloadableClassifier.load_from_checkpoint(tmp_path / "delta.ckpt").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids), expected)
    # resume: the callback attaches (recomputing the residual) and compares the fingerprint
    resumed = Classifier(source)
    resume = trainer(tmp_path, [DeltaCallback(LoraConfig(r=4, targets="all-linear", init="pissa"),
                                              trainable=["classifier"])], max_steps=6, max_epochs=-1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resume.fit(resumed, loader(), ckpt_path=str(tmp_path / "delta.ckpt"))
    assert not [w for w in caught if "backbone weights differ" in str(w.message)]
    assert resume.global_step == 6


@pytest.mark.parametrize(("init", "family", "rslora"),
                         [("pissa", "bert", False), ("olora", "bert", False), ("pissa", "bert", True),
                          ("pissa", "gpt2", False), ("olora", "gpt2", False), ("gaussian", "bert", False)])
def test_peft_export_is_relative_to_the_original_weights(tmp_path, init, family, rslora):
    make, targets, _ = FAMILY[family]
    base = make().eval()
    model = copy.deepcopy(base)
    handle = attach(model, "lora", targets=targets, r=4, alpha=8, init=init, rslora=rslora)
    perturb(handle)
    ours = logits(model, family)
    assert not torch.allclose(ours, logits(base, family), rtol=0, atol=1e-4)  # the training matters
    export_peft(model, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    r = loaded.peft_config["default"].r
    assert r == (8 if init in ("pissa", "olora") else 4)
    torch.testing.assert_close(logits(loaded, family), ours, rtol=0, atol=1e-5)


def test_residual_init_refuses_meta_weights():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(UnsupportedModuleError, match="meta"):
        attach(model, "lora", targets="0", r=2, init="pissa")


def test_half_precision_backbone_is_restored_up_to_its_rounding():
    model = nn.Sequential(nn.Linear(64, 64)).to(torch.bfloat16)
    weight, x = model[0].weight.detach().clone(), torch.randn(4, 64, dtype=torch.bfloat16)
    reference = model(x)
    handle = attach(model, "lora", targets="0", r=8, init="pissa")
    assert handle.deltas()[0].module.A.dtype == torch.float32
    scale = reference.float().abs().max().item()  # the residual is stored in bf16: bf16 rounding of the output
    torch.testing.assert_close(model(x), reference, rtol=0, atol=torch.finfo(torch.bfloat16).eps * 2 * scale)
    residual = model[0].weight.detach().float().clone()
    handle.detach()
    # two roundings (residual, restored weight), each at most half a unit in the last place of its value
    bound = torch.finfo(torch.bfloat16).eps * torch.maximum(weight.float().abs(), residual.abs())
    error = (model[0].weight.float() - weight.float()).abs()
    assert (error <= bound).all()
    assert (error == 0).float().mean() > 0.5  # most entries come back bit-exact
