"""VeRA, LoHa, LoKr and OFT: parameter counts, identity at init, gradients, training on every family,
equality with PEFT on the same tensors, merge/unmerge, save/load and export to PEFT's format."""

import copy

import peft
import pytest
import torch

from lightning_delta import (
    DeltaCallback,
    DeltaConfigError,
    DeltaModel,
    LohaConfig,
    LokrConfig,
    OftConfig,
    VeraConfig,
    attach,
    load_delta,
    param_groups,
    save_delta,
    trainable_parameters,
)
from lightning_delta.peft_format import export_peft
from lightning_delta.methods.lokr import factorization
from lightning_helpers import Classifier, LanguageModel, ReloadableClassifier, loader, save_pretrained_bert, trainer
from models import FAMILIES, family_inputs, family_output, tiny_bert, tiny_gpt2, tiny_llama
from method_cases import CASES, randomize  # randomize: every trainable delta tensor (VeRA's projections stay)

METHODS = ["vera", "loha", "lokr", "oft"]
SMALL = {method: CASES[method].hparams for method in METHODS}  # the case table's settings for the tiny models
TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


# -- (a) parameter counts on a tiny BERT: query and value (32 -> 32) in 2 layers -------------------
H, L = 32, 2


@pytest.mark.parametrize(
    ("config", "count"),
    [
        (VeraConfig(r=16), L * 2 * (16 + H)),  # lambda_d (r) + lambda_b (out); A, B are frozen buffers
        (VeraConfig(), L * 2 * (256 + H)),
        (LohaConfig(r=4), L * 2 * 2 * 4 * (H + H)),  # two (out x r) @ (r x in) products
        # 32 = 4 * 8 on both sides: w1 (4 x 4) full; w2 (8 x 8) full while r >= 8 / 2, else r * (8 + 8)
        (LokrConfig(), L * 2 * (4 * 4 + 8 * 8)),
        (LokrConfig(r=2), L * 2 * (4 * 4 + 2 * (8 + 8))),
        (LokrConfig(r=1, decompose_both=True), L * 2 * (1 * (4 + 4) + 1 * (8 + 8))),
        (LokrConfig(r=8, decompose_factor=2), L * 2 * (2 * 2 + 16 * 16)),  # 32 = 2 * 16
        (OftConfig(block_size=8), L * 2 * (H // 8) * (8 * 7 // 2)),  # free entries of 4 skew blocks
        (OftConfig(), L * 2 * (32 * 31 // 2)),
    ],
)
def test_trainable_parameter_count_equals_the_formula(config, count):
    handle = attach(tiny_bert(), config)
    assert handle.summary().delta == count
    assert sum(p.numel() for p in handle.delta_parameters()) == count


def test_lokr_factorization_follows_peft():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dim in (1, 7, 32, 64, 96, 127, 128, 256, 768, 3072, 4096):
        for factor in (-1, 2, 4, 8, 5):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


def test_vera_projections_are_shared_frozen_and_never_optimised():
    model = tiny_bert()
    handle = randomize(attach(model, "vera", r=16).freeze_backbone())
    found = handle.deltas()
    assert len(found) == 2 * L
    a, b = found[0].module.A, found[0].module.B
    assert a.shape == (16, H) and b.shape == (H, 16)
    assert all(d.module.A is a and d.module.B is b for d in found)
    assert not a.requires_grad and not b.requires_grad
    model(**family_inputs("bert"), labels=torch.tensor([0, 1])).loss.backward()
    assert a.grad is None and b.grad is None
    ids = {id(a), id(b)}
    assert not ids & {id(p) for p in trainable_parameters(model)}
    assert not ids & {id(p) for group in param_groups(model, lr=1e-3) for p in group["params"]}
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-3)
    before = a.clone()
    optimizer.step()
    assert not ids & {id(p) for p in optimizer.state}
    assert torch.equal(a, before)
    # moving or casting the model keeps one shared pair
    model.double()
    assert all(d.module.A is found[0].module.A for d in handle.deltas())
    assert found[0].module.A.dtype == torch.float32


def test_vera_projections_come_from_the_seed_and_span_the_widest_target():
    # GPT-2: c_attn (32 -> 96) and c_fc (32 -> 128), c_proj of the MLP (128 -> 32)
    def draw(seed, projection_seed=None):
        model = tiny_gpt2()
        torch.manual_seed(seed)
        attach(model, "vera", targets=["c_attn", "mlp.c_proj"], r=8, projection_seed=projection_seed)
        return DeltaModel(model).deltas()[0].module

    first, again, other = draw(0), draw(0), draw(1)
    assert first.A.shape == (8, 128) and first.B.shape == (96, 8)  # (r, max in), (max out, r)
    assert torch.equal(first.A, again.A) and torch.equal(first.B, again.B)
    assert not torch.equal(first.A, other.A)
    fixed, fixed_other_run = draw(0, projection_seed=7), draw(1, projection_seed=7)
    assert torch.equal(fixed.A, fixed_other_run.A) and torch.equal(fixed.B, fixed_other_run.B)


# -- (d) 30 optimizer steps lower the loss on every family ------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", METHODS)
def test_thirty_steps_lower_the_loss(tmp_path, method, family):
    module = LanguageModel(family, lr=0.05)
    module.losses = []
    trainer(tmp_path, [DeltaCallback(method)], max_steps=30).fit(module)
    # deterministic (fixed batch, no dropout): a delta cut off from the gradient would leave the loss where it started
    assert sum(module.losses[-5:]) < 0.9995 * sum(module.losses[:5]), module.losses


# -- (e) equal to PEFT holding the same tensors -----------------------------------------------------
def peft_config(method, targets, transposed, **hparams):
    if method == "vera":
        return peft.VeraConfig(r=hparams["r"], target_modules=targets, fan_in_fan_out=transposed,
                               projection_prng_key=hparams.get("projection_seed") or 0)
    if method == "loha":
        return peft.LoHaConfig(r=hparams["r"], alpha=hparams["alpha"], target_modules=targets)
    if method == "lokr":
        return peft.LoKrConfig(r=hparams["r"], alpha=hparams["alpha"], target_modules=targets,
                               decompose_both=hparams.get("decompose_both", False))
    return peft.OFTConfig(r=0, oft_block_size=hparams["block_size"], target_modules=targets,
                          use_cayley_neumann=hparams.get("cayley_neumann", True))


def peft_state(handle, method):
    """Our tensors under PEFT's state-dict keys (adapter "default")."""
    state = {}
    for d in handle.deltas():
        prefix, m = f"base_model.model.{d.target_path}", d.module
        if method == "vera":
            state[f"{prefix}.vera_lambda_d.default"] = m.lambda_d.detach()
            state[f"{prefix}.vera_lambda_b.default"] = m.lambda_b.detach()
            state["base_model.vera_A.default"], state["base_model.vera_B.default"] = m.A, m.B
        elif method == "loha":
            for part in ("w1_a", "w1_b", "w2_a", "w2_b"):
                state[f"{prefix}.hada_{part}.default"] = getattr(m, part).detach()
        elif method == "lokr":
            for part in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b"):
                if isinstance(getattr(m, part, None), torch.Tensor):
                    state[f"{prefix}.lokr_{part}.default"] = getattr(m, part).detach()
        else:
            state[f"{prefix}.oft_R.default.weight"] = m.skew.detach()
    return state


PARITY = [("vera", "bert", {}), ("vera", "llama", {}), ("vera", "gpt2", {}),
          ("vera", "llama", {"targets": ["q_proj", "up_proj", "down_proj"]}),  # widths 32 and 64 share A, B
          ("loha", "bert", {}), ("loha", "llama", {}),
          ("lokr", "bert", {}), ("lokr", "llama", {}), ("lokr", "bert", {"r": 8}),
          ("lokr", "llama", {"r": 1, "decompose_both": True}),
          ("oft", "bert", {}), ("oft", "llama", {}),
          ("oft", "bert", {"cayley_neumann": False})]


PARITY_IDS = [f"{m}-{f}-{'-'.join(map(str, e.values())) or 'default'}".replace(" ", "") for m, f, e in PARITY]


@pytest.mark.parametrize(("method", "family", "extra"), PARITY, ids=PARITY_IDS)
def test_equals_peft_with_the_same_tensors(method, family, extra):
    hparams = {**SMALL[method], **extra}
    targets = hparams.pop("targets", TARGETS[family])
    base = FAMILIES[family]().eval()
    model = copy.deepcopy(base)
    handle = randomize(attach(model, method, targets=targets, **hparams), scale=0.1 if method == "oft" else 0.2)
    inputs = family_inputs(family)
    ours = family_output(model, inputs)
    assert not torch.allclose(ours, family_output(base, inputs), rtol=0, atol=1e-5)  # the delta matters
    twin = peft.get_peft_model(copy.deepcopy(base), peft_config(method, targets, family == "gpt2", **hparams))
    state = peft_state(handle, method)
    reference = twin.state_dict()
    unknown = set(state) - set(reference)
    assert not unknown, unknown
    for key, value in state.items():
        assert reference[key].shape == value.shape, key
    twin.load_state_dict(state, strict=False)
    theirs = family_output(twin.eval(), inputs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_vera_with_a_projection_seed_draws_peft_matrices():
    base = tiny_bert().eval()
    model = copy.deepcopy(base)
    handle = attach(model, "vera", r=16, projection_seed=3)
    twin = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(r=16, target_modules=["query", "value"],
                                                                    projection_prng_key=3))
    module = handle.deltas()[0].module
    torch.testing.assert_close(module.A, twin.state_dict()["base_model.vera_A.default"], rtol=0, atol=0)
    torch.testing.assert_close(module.B, twin.state_dict()["base_model.vera_B.default"], rtol=0, atol=0)


# -- (f) merge, unmerge ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_merge_gives_the_unmerged_outputs_and_unmerge_restores(method, family):
    model = FAMILIES[family]().eval()
    inputs = family_inputs(family)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    handle = randomize(attach(model, method, **SMALL[method]), scale=0.1 if method == "oft" else 0.2)
    unmerged = family_output(model, inputs)
    assert not torch.allclose(unmerged, family_output(FAMILIES[family]().eval(), inputs), atol=1e-4)
    handle.merge()
    assert handle.merged
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    torch.testing.assert_close(family_output(model, inputs), unmerged, rtol=1e-4, atol=1e-5)
    handle.unmerge()
    for key, value in weights.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(family_output(model, inputs), unmerged, rtol=1e-5, atol=1e-6)


def test_oft_rotation_is_orthogonal_with_the_exact_cayley_transform():
    handle = randomize(attach(tiny_bert(), "oft", block_size=8, cayley_neumann=False), scale=0.5)
    rotation = handle.deltas()[0].module.rotation()
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(H), rtol=0, atol=1e-5)


# -- (g) save / load ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_gives_identical_outputs(tmp_path, method):
    base = tiny_gpt2().eval()
    twin, twin_files = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(0)
    handle = randomize(attach(base, method, **SMALL[method]).freeze_backbone())
    expected = family_output(base, family_inputs("gpt2"))
    torch.manual_seed(1)  # another run seed: VeRA's projections must come from the state, not the seed
    attach(twin, method, **SMALL[method]).freeze_backbone().load_delta_state_dict(handle.delta_state_dict())
    torch.testing.assert_close(family_output(twin, family_inputs("gpt2")), expected, rtol=0, atol=0)
    save_delta(base, tmp_path / "delta")
    load_delta(twin_files, tmp_path / "delta")
    torch.testing.assert_close(family_output(twin_files.eval(), family_inputs("gpt2")), expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_lightning_checkpoint_reloads_the_trained_outputs(tmp_path, method):
    source = save_pretrained_bert(tmp_path / "bert")
    module = Classifier(source)
    torch.manual_seed(0)
    run = trainer(tmp_path, [DeltaCallback(method, trainable=["classifier"], **SMALL[method])], max_steps=3)
    run.fit(module, loader())
    run.save_checkpoint(tmp_path / "delta.ckpt")
    keys = torch.load(tmp_path / "delta.ckpt", weights_only=True)["state_dict"]
    if method == "vera":  # the shared projections once, under the first target's delta
        assert sorted(k for k in keys if k.endswith((".vera.A", ".vera.B"))) == [
            "model.bert.encoder.layer.0.attention.self.query.vera.A",
            "model.bert.encoder.layer.0.attention.self.query.vera.B"]
    ids = loader().dataset.tensors[0]
    torch.manual_seed(1)  # another seed: nothing may come from a fresh draw
    reloaded = ReloadableClassifier.load_from_checkpoint(tmp_path / "delta.ckpt").eval()
    torch.testing.assert_close(reloaded(ids), module.eval()(ids), rtol=0, atol=0)
    fresh = Classifier(source).eval()
    load_delta(fresh, tmp_path / "delta.ckpt")
    torch.testing.assert_close(fresh(ids), module(ids), rtol=0, atol=0)


def test_vera_state_holds_the_projections_once_or_not_at_all():
    model = tiny_bert()
    state = attach(model, "vera", r=16).freeze_backbone().delta_state_dict()
    assert sorted(k for k in state if k.endswith((".A", ".B"))) == [
        "bert.encoder.layer.0.attention.self.query.vera.A", "bert.encoder.layer.0.attention.self.query.vera.B"]
    assert len(state) == 2 * 2 * L + 2

    base = tiny_bert().eval()
    model, twin = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(0)
    handle = randomize(attach(model, "vera", r=16, projection_seed=5, save_projection=False).freeze_backbone())
    state = handle.delta_state_dict()
    assert not any(k.endswith((".A", ".B")) for k in state)
    torch.manual_seed(1)
    attach(twin, "vera", r=16, projection_seed=5, save_projection=False).freeze_backbone().load_delta_state_dict(state)
    inputs = family_inputs("bert")
    torch.testing.assert_close(twin(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


# -- export to PEFT's adapter format -----------------------------------------------------------------
EXPORT = [("vera", "bert"), ("vera", "gpt2"), ("vera", "llama"), ("loha", "bert"), ("loha", "llama"),
          ("lokr", "bert"), ("lokr", "t5"), ("oft", "bert"), ("oft", "llama")]


@pytest.mark.parametrize(("method", "family"), EXPORT, ids=[f"{m}-{f}" for m, f in EXPORT])
def test_peft_loads_the_export_and_gives_the_same_outputs(tmp_path, method, family):
    base = FAMILIES[family]().eval()
    model = copy.deepcopy(base)
    randomize(attach(model, method, **SMALL[method]), scale=0.1 if method == "oft" else 0.2)
    export_peft(model, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    inputs = family_inputs(family)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    ours = family_output(model, inputs)
    assert not torch.allclose(ours, family_output(base, inputs), rtol=0, atol=1e-4)
    torch.testing.assert_close(family_output(loaded, inputs), ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["loha", "lokr", "oft"])
def test_export_refuses_conv1d_targets_peft_cannot_load(tmp_path, method):
    model = tiny_gpt2()
    attach(model, method, **SMALL[method])
    with pytest.raises(DeltaConfigError, match=f"PEFT's {method} takes only nn.Linear targets"):
        export_peft(model, tmp_path)


# -- bad hyper-parameters ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "kwargs", "bad"),
    [("vera", {"r": 0}, "r=0"), ("vera", {"d_initial": 0}, "d_initial=0"), ("vera", {"dropout": 1.0}, "dropout=1.0"),
     ("vera", {"save_projection": False}, "save_projection=False"),
     ("vera", {"projection_seed": -1}, "projection_seed=-1"),
     ("loha", {"r": -1}, "r=-1"), ("loha", {"alpha": 0}, "alpha=0"), ("lokr", {"r": 1.5}, "r=1.5"),
     ("lokr", {"decompose_factor": 0}, "decompose_factor=0"), ("oft", {"block_size": 1}, "block_size=1"),
     ("oft", {"neumann_terms": 1}, "neumann_terms=1"), ("oft", {"block_size": 5}, "block_size=5")],
)
def test_bad_hyperparameters_are_named(method, kwargs, bad):
    model = tiny_bert()
    keys = list(model.state_dict())
    with pytest.raises(DeltaConfigError) as err:
        attach(model, method, **kwargs)
    assert bad in str(err.value)
    assert list(model.state_dict()) == keys


def test_every_method_attaches_by_preset_with_defaults():
    for build, family in ((tiny_bert, "bert"), (tiny_gpt2, "gpt2"), (tiny_llama, "llama")):
        for method in METHODS:
            assert len(attach(build(), method).deltas()) == 2 * (1 if family == "gpt2" else 2)


@pytest.mark.parametrize("method", METHODS)
def test_delta_stays_fp32_under_a_bf16_backbone(method):
    from torch import nn

    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8)).to(torch.bfloat16)
    handle = randomize(attach(model, method, targets=["0", "1"], **SMALL[method]), scale=0.05)
    model.to(torch.bfloat16)  # casting the model afterwards keeps the delta's dtype
    tensors = [*handle.delta_parameters(), *(b for d in handle.deltas() for b in d.module.buffers()
                                             if b.is_floating_point())]
    assert tensors and all(t.dtype == torch.float32 for t in tensors)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    out = model(x)
    assert out.dtype == torch.bfloat16
    handle.merge()
    torch.testing.assert_close(model(x), out, rtol=0.05, atol=0.05)
