"""Every method: identity at init, gradients only to deltas, training on every family, save/load,
merge, parameter counts; IA3 and DoRA against PEFT; combinations."""

import copy

import peft
import pytest
import torch

from lightning_delta import (
    AdapterConfig,
    BitFitConfig,
    CompacterConfig,
    DeltaCallback,
    DeltaModel,
    IA3Config,
    LayerNormConfig,
    LoraConfig,
    LowRankAdapterConfig,
    MergeError,
    ParallelAdapterConfig,
    PrefixConfig,
    PromptConfig,
    attach,
    make_config,
)
from lightning_helpers import LanguageModel, trainer
from method_cases import MERGEABLE, randomize
from models import FAMILIES, family_inputs, family_output, tiny_bert, tiny_gpt2

IDENTITY_AT_INIT = ["lora", "dora", "ia3", "bitfit", "layernorm", "adapter", "parallel_adapter", "low_rank_adapter",
                    "compacter"]
METHODS = IDENTITY_AT_INIT + ["prompt", "prefix"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", METHODS)
def test_thirty_steps_lower_the_loss(tmp_path, method, family):
    module = LanguageModel(family, lr=0.05)
    module.losses = []
    # a soft prompt in front of a frozen, random classification head has nothing to steer: train the
    # head with it, as PEFT does for sequence classification (modules_to_save)
    trainable = "classifier" if method in ("prompt", "prefix") and family == "bert" else None
    trainer(tmp_path, [DeltaCallback(method, trainable=trainable)], max_steps=30).fit(module)
    # deterministic (fixed batch, no dropout): any drop is learning; a delta cut off from the
    # gradient would leave the loss exactly where it started
    assert sum(module.losses[-5:]) < 0.9995 * sum(module.losses[:5]), module.losses


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_gives_identical_outputs(method):
    base = tiny_gpt2().eval()
    twin = copy.deepcopy(base)
    handle = randomize(attach(base, method).freeze_backbone())
    expected = family_output(base, family_inputs("gpt2"))
    attach(twin, method).freeze_backbone().load_delta_state_dict(handle.delta_state_dict())
    torch.testing.assert_close(family_output(twin, family_inputs("gpt2")), expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("method", MERGEABLE)
def test_merge_gives_the_unmerged_outputs_and_unmerge_restores(method, family):
    model = FAMILIES[family]().eval()
    inputs = family_inputs(family)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    handle = randomize(attach(model, method))
    unmerged = family_output(model, inputs)
    if method == "bitfit" and family == "llama":  # Llama's linears have no bias to fold into
        with pytest.raises(MergeError, match="no bias"):
            handle.merge()
        return
    handle.merge()
    torch.testing.assert_close(family_output(model, inputs), unmerged, rtol=1e-4, atol=1e-5)
    handle.unmerge()
    for key, value in weights.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["adapter", "parallel_adapter", "low_rank_adapter", "compacter", "prompt", "prefix"])
def test_additive_methods_refuse_merge(method):
    with pytest.raises(MergeError, match=f"'{method}' has no merge"):
        attach(tiny_bert(), method).merge()


def test_compacter_rules_are_shared_by_every_adapter_of_one_attach():
    model = tiny_bert()
    first = attach(model, "compacter").deltas()
    second = attach(model, "compacter").deltas("compacter_2")
    assert len({id(d.module.rules) for d in first}) == 1
    assert first[0].module.rules is not second[0].module.rules


# -- parameter counts on a tiny BERT (hidden 32, intermediate 64, 2 layers, 2 labels) -----------
H, I, L = 32, 64, 2  # noqa: E741 - hidden, intermediate, layers


@pytest.mark.parametrize(
    ("config", "count"),
    [
        (AdapterConfig(bottleneck_dim=8), L * 2 * (2 * H * 8 + 8 + H)),  # attention and FFN outputs
        (AdapterConfig(bottleneck_dim=8, placement="pfeiffer"), L * (2 * H * 8 + 8 + H)),
        (IA3Config(), L * (H + H + I)),  # key, value outputs; FFN down projection input
        (LayerNormConfig(), (1 + 2 * L) * 2 * H),  # embeddings LN + two per layer, gain and bias
        (LoraConfig(r=4), L * 2 * 4 * (H + H)),
        ("dora", L * 2 * (8 * (H + H) + H)),
        (ParallelAdapterConfig(bottleneck_dim=8), L * (2 * H * 8 + 8 + H)),  # beside each feed-forward block
        (LowRankAdapterConfig(bottleneck_dim=8, rank=2), L * 2 * (2 * 2 * (H + 8) + 8 + H)),
        # PHM: n * (b/n * k + k * d/n) per projection, biases, and the n^3 rules shared once
        (CompacterConfig(bottleneck_dim=8, phm_dim=4, rank=1), L * 2 * (2 * (8 + H) + 8 + H) + 4 ** 3),
        (PromptConfig(num_virtual_tokens=5), 5 * H),
        (PrefixConfig(num_virtual_tokens=5), 5 * L * 2 * H),  # keys and values of every layer
        # q, k, v, attention output, its LN, intermediate, output, its LN; embeddings LN and pooler
        (BitFitConfig(), L * (7 * H + I) + 2 * H),
    ],
)
def test_trainable_parameter_count_equals_the_formula(config, count):
    assert attach(tiny_bert(), config).summary().delta == count


# -- against PEFT ---------------------------------------------------------------------------------
def test_ia3_equals_peft_with_the_same_vectors():
    base = tiny_bert().eval()
    model = copy.deepcopy(base)
    handle = randomize(attach(model, "ia3"))
    twin = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(
        target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"],
        exclude_modules=["attention.output.dense"]))
    state = {}
    for d in handle.deltas():
        vector = d.module.scale.detach()
        state[f"base_model.model.{d.target_path}.ia3_l.default"] = vector[None, :] if d.module.on_input \
            else vector[:, None]
    missing = set(state) - set(twin.state_dict())
    assert not missing, missing
    twin.load_state_dict(state, strict=False)
    inputs = family_inputs("bert")
    assert not torch.allclose(model(**inputs).logits, base(**inputs).logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(model(**inputs).logits, twin.eval()(**inputs).logits, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2])
def test_dora_equals_peft_with_the_same_factors(build):
    base = build().eval()
    model = copy.deepcopy(base)
    targets = ["query", "value"] if build is tiny_bert else ["c_attn"]
    handle = randomize(attach(model, "dora", targets=targets, r=4, alpha=8))
    twin = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, use_dora=True, fan_in_fan_out=build is tiny_gpt2))
    state = {}
    for d in handle.deltas():
        prefix = f"base_model.model.{d.target_path}"
        state[f"{prefix}.lora_A.default.weight"] = d.module.A.detach()
        state[f"{prefix}.lora_B.default.weight"] = d.module.B.detach()
        state[f"{prefix}.lora_magnitude_vector.default.weight"] = d.module.magnitude.detach()
    assert not set(state) - set(twin.state_dict())
    twin.load_state_dict(state, strict=False)
    family = "bert" if build is tiny_bert else "gpt2"
    inputs = family_inputs(family)
    assert not torch.allclose(family_output(model, inputs), family_output(base, inputs), rtol=0, atol=1e-5)
    torch.testing.assert_close(family_output(model, inputs), family_output(twin.eval(), inputs),
                               rtol=1e-5, atol=1e-5)


# -- combinations ---------------------------------------------------------------------------------
COMBOS = [["lora", "bitfit"], ["adapter", "ia3"], ["lora", "layernorm", "adapter"], ["dora", "bitfit"],
          ["parallel_adapter", "lora"], ["compacter", "bitfit"], ["prompt", "lora"], ["prefix", "ia3"]]


@pytest.mark.parametrize("combo", COMBOS, ids=["+".join(c) for c in COMBOS])
def test_combinations_train_save_load_and_detach_one(tmp_path, combo):
    module = LanguageModel("gpt2", lr=0.05)
    module.losses = []
    configs = [AdapterConfig() if m == "adapter" else m for m in combo]
    trainer(tmp_path, [DeltaCallback([make_config(c) for c in configs])], max_steps=20).fit(module)
    assert sum(module.losses[-5:]) < 0.99 * sum(module.losses[:5])
    model = module.model.eval()
    handle = DeltaModel(model)
    assert set(handle.configs) == set(combo)
    inputs = family_inputs("gpt2")
    expected = family_output(model, inputs)

    twin = FAMILIES["gpt2"]().eval()
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if k in twin.state_dict()})
    twin_handle = attach(twin, [make_config(c) for c in configs]).freeze_backbone()
    twin_handle.load_delta_state_dict(handle.delta_state_dict())
    torch.testing.assert_close(family_output(twin, inputs), expected, rtol=0, atol=0)

    # detaching one equals never having attached it
    handle.detach(combo[0])
    rest = FAMILIES["gpt2"]().eval()
    rest.load_state_dict({k: v for k, v in model.state_dict().items() if k in rest.state_dict()})
    rest_handle = attach(rest, [make_config(c) for c in configs[1:]]).freeze_backbone()
    rest_handle.load_delta_state_dict(handle.delta_state_dict())
    torch.testing.assert_close(family_output(model, inputs), family_output(rest, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_attaches_by_preset_to_roberta(method):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    model = RobertaForSequenceClassification(RobertaConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=72, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    inputs = family_inputs("bert")
    reference = model(**inputs).logits
    handle = attach(model, method)
    assert handle.deltas()
    if method in IDENTITY_AT_INIT:
        torch.testing.assert_close(model(**inputs).logits, reference, rtol=0, atol=1e-6)
    else:
        assert model(**inputs).logits.shape == reference.shape


NEWER = {"adalora": "adalora", "lora-gaussian": LoraConfig(init="gaussian"), "lora-pissa": LoraConfig(init="pissa"),
         "lora-olora": LoraConfig(init="olora")}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", sorted(NEWER))
def test_thirty_steps_lower_the_loss_with_adalora_and_every_lora_init(tmp_path, method, family):
    module = LanguageModel(family, lr=0.05)
    module.losses = []
    # AdaLoRA starts with zero singular values: in front of a random frozen classification head its
    # first 30 steps have nothing to steer, so the head trains with it there (as in test_thirty_steps...)
    trainable = "classifier" if method == "adalora" and family == "bert" else None
    trainer(tmp_path, [DeltaCallback(NEWER[method], trainable=trainable)], max_steps=30).fit(module)
    assert sum(module.losses[-5:]) < 0.9995 * sum(module.losses[:5]), module.losses
