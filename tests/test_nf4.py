"""4-bit NF4 backbones (torchao) with fp32 deltas: selection, numerics, casts, merge, checkpoints, Lightning."""

import warnings
from collections import OrderedDict

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("torchao")

from lightning_helpers import trainer  # noqa: E402

from lightning_delta import DeltaCallback, DeltaModel, LoraConfig, attach, load_delta, save_delta  # noqa: E402
from lightning_delta.errors import MergeError, UnsupportedModuleError  # noqa: E402
from lightning_delta.fingerprint import compare_fingerprint
from lightning_delta.quantize import (  # noqa: E402
    NF4Linear,
    dequantize,
    is_quantized,
    parameter_bytes,
    quantize_nf4,
    tensor_bytes,
)
from lightning_delta.fingerprint import fingerprint  # noqa: E402

LORA_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def small_llama(layers: int = 4, hidden: int = 256, seed: int = 0):
    """A random Llama whose Linear weights are multiples of 64 * 256 (one NF4 scaler block)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=99, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def ids(batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 99, (batch, seq), generator=torch.Generator().manual_seed(1))


def with_lora(model):
    """LoRA on four projections with non-zero, seeded ``B`` (so the update matters)."""
    handle = attach(model, LoraConfig(r=8, targets=LORA_TARGETS))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for d in handle.deltas():
            d.module.B.copy_(torch.randn(d.module.B.shape, generator=gen) * 0.05)
    return handle.freeze_backbone()


def dequantized_copy(model):
    """A float model whose Linear weights are the NF4 model's dequantized values (same names)."""
    plain = small_llama(layers=len(model.model.layers))
    state = {k: (v.get_original_weight() if is_quantized(v) else v) for k, v in model.state_dict().items()}
    missing, unexpected = plain.load_state_dict({k: v for k, v in state.items() if ".lora." not in k}, strict=False)
    assert not unexpected and all(".lora." in k for k in missing)
    return plain


def test_quantizes_the_frozen_linear_layers_and_keeps_names_and_shapes():
    model = small_llama()
    before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names = quantize_nf4(model)
    assert names == [f"model.layers.{i}.{part}.{p}" for i in range(4)
                     for part, ps in (("self_attn", PROJECTIONS[:4]), ("mlp", PROJECTIONS[4:])) for p in ps]
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == before  # same keys, logical shapes
    for name in names:
        layer = model.get_submodule(name)
        assert type(layer) is NF4Linear and is_quantized(layer.weight) and not layer.weight.requires_grad
    assert type(model.lm_head) is nn.Linear and not is_quantized(model.lm_head.weight)  # the head stays, as QLoRA
    assert quantize_nf4(model) == []  # idempotent


def test_memory_of_the_backbone():
    model = small_llama()
    linear_params = sum(model.get_submodule(n).weight.numel() for n, m in model.named_modules()
                        if type(m) is nn.Linear and n != "lm_head")
    before = parameter_bytes(model)
    names = quantize_nf4(model)
    after = parameter_bytes(model)
    nf4 = sum(tensor_bytes(model.get_submodule(n).weight) for n in names)
    per_param = nf4 / linear_params
    # 4 bits per weight + an int8 scale per 64 weights + an fp32 factor per 256 scales (+ a 16-entry table)
    assert 0.5 < per_param < 0.53
    assert after / before < 0.16  # fp32 -> NF4 linears; embeddings, norms and the head stay fp32
    print(f"backbone parameter bytes {before} -> {after} ({after / before:.3f}); NF4 linears {per_param:.4f} B/param")


def test_forward_computes_with_the_dequantized_weight_and_trains_lora_through_it():
    reference = small_llama()
    model = small_llama()
    quantize_nf4(model)
    plain = dequantized_copy(model)
    for m in (reference, model, plain):
        with_lora(m)
    x = ids()
    outs = {name: m(input_ids=x, labels=x) for name, m in (("fp32", reference), ("nf4", model), ("deq", plain))}
    # exactly the float model holding the 4-bit values, forward and backward
    torch.testing.assert_close(outs["nf4"].logits, outs["deq"].logits, rtol=1e-5, atol=1e-5)
    for out in outs.values():
        out.loss.backward()
    grads = {name: torch.cat([p.grad.flatten() for p in DeltaModel(m).delta_parameters()])
             for name, m in (("fp32", reference), ("nf4", model), ("deq", plain))}
    assert all(p.dtype == torch.float32 for p in DeltaModel(model).delta_parameters())
    assert F.cosine_similarity(grads["nf4"], grads["deq"], dim=0) > 0.9999
    # against the fp32 backbone: NF4's rounding (~9% of each weight, compounding over 4 random layers)
    diff = (outs["nf4"].logits - outs["fp32"].logits).detach()
    relative = diff.norm() / outs["fp32"].logits.norm()
    cosine = F.cosine_similarity(grads["nf4"], grads["fp32"], dim=0)
    print(f"NF4 vs fp32: max |logit diff| {diff.abs().max():.4f} (max |logit| {outs['fp32'].logits.abs().max():.4f}),"
          f" relative {relative:.4f}; LoRA gradient cosine {cosine:.4f}")
    assert relative < 0.3
    assert cosine > 0.9


@pytest.mark.parametrize("method", ["dora", "ia3", "loha", "vera", "adapter"])
def test_other_hook_methods_train_on_nf4_as_on_the_dequantized_weights(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256))
    quantize_nf4(model)
    plain = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256))
    plain.load_state_dict({k: v.get_original_weight() if is_quantized(v) else v for k, v in model.state_dict().items()})
    x = torch.randn(4, 256)
    grads = []
    for m in (model, plain):
        handle = attach(m, method, targets="0")
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():  # move every delta tensor away from its identity initialisation
            for p in handle.delta_parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        handle.freeze_backbone()
        out = m(x)
        out.square().mean().backward()
        grads.append((out.detach(), torch.cat([p.grad.flatten() for p in handle.delta_parameters()])))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-5)
    assert F.cosine_similarity(grads[0][1], grads[1][1], dim=0) > 0.9999


def test_one_layer_error_is_nf4_rounding():
    torch.manual_seed(0)
    layer = nn.Linear(512, 256)
    x = torch.randn(8, 512)
    expected = layer(x)
    quantize_nf4(nn.Sequential(layer))
    assert type(layer) is NF4Linear
    relative = (layer(x) - expected).norm() / (expected - layer.bias).norm()
    assert relative < 0.12  # NF4 keeps each weight to ~9% (relative RMS)


def test_before_or_after_attach_gives_the_same_model():
    first, second = small_llama(), small_llama()
    quantize_nf4(first)
    with_lora(first)
    with_lora(second)
    names = quantize_nf4(second)
    assert names == [n for n, m in first.named_modules() if isinstance(m, NF4Linear)]
    x = ids()
    torch.testing.assert_close(first(input_ids=x).logits, second(input_ids=x).logits)


def test_delta_modules_trained_modules_ties_skips_and_head():
    model = small_llama(layers=1)
    attach(model, "adapter", targets=["down_proj"])  # adapter deltas hold nn.Linear layers of their own
    names = quantize_nf4(model, skip=["o_proj"])
    assert "model.layers.0.self_attn.o_proj" not in names and "model.layers.0.self_attn.q_proj" in names
    assert not any(".adapter" in n for n in names)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if ".adapter." in n)

    trained = small_llama(layers=1)
    attach(trained, "lora", targets=["q_proj"]).freeze_backbone(trainable=["v_proj"])
    assert "model.layers.0.self_attn.v_proj" not in quantize_nf4(trained)

    head = small_llama(layers=1)
    assert quantize_nf4(head, head=True, skip=["re:.*proj"], scaler_block_size=4) == ["lm_head"]  # 99 x 256

    parts = {"embed": nn.Embedding(256, 256), "a": nn.Linear(256, 256), "b": nn.Linear(256, 256),
             "head": nn.Linear(256, 4)}
    tied = nn.Sequential(OrderedDict(parts))
    tied.b.weight = tied.embed.weight  # tied to the embedding: must stay a float table
    assert quantize_nf4(tied) == ["a"]  # "head" is an output head by name


def test_layers_that_do_not_fit_the_blocks_are_refused_before_anything_changes():
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(32, 32))
    with pytest.raises(UnsupportedModuleError, match=r"1 \(\(32, 32\): 1024 weights, not a multiple .* 16384.*skip="):
        quantize_nf4(model)
    assert all(type(m) is nn.Linear for m in model)
    assert quantize_nf4(model, skip="1") == ["0"]
    assert quantize_nf4(nn.Sequential(nn.Linear(32, 32)), block_size=16, scaler_block_size=4) == ["0"]
    with torch.device("meta"):
        empty = nn.Sequential(nn.Linear(256, 256))
    with pytest.raises(UnsupportedModuleError, match="meta device: quantize after the pretrained weights are loaded"):
        quantize_nf4(empty)


def holds_dense_copy(weight) -> bool:
    """Whether a wrapper tensor also holds a dense storage (what ``param.data = dense`` leaves behind)."""
    try:
        return weight.untyped_storage().data_ptr() != 0
    except RuntimeError:  # a wrapper subclass without storage of its own
        return False


def test_casts_keep_the_weight_4bit():
    model = small_llama(layers=1)
    handle = with_lora(model)
    quantize_nf4(model)
    q_proj = model.model.layers[0].self_attn.q_proj
    weight, nbytes = q_proj.weight, tensor_bytes(q_proj.weight)
    model.to(torch.bfloat16)
    assert q_proj.weight is weight and is_quantized(weight) and tensor_bytes(weight) == nbytes
    assert not holds_dense_copy(weight)  # nn.Linear's cast would leave a full bf16 copy in the wrapper
    assert weight.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
    assert {p.dtype for p in handle.delta_parameters()} == {torch.float32}
    out = model(input_ids=ids()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    model.float().to("cpu")
    assert weight.dtype == torch.float32 and is_quantized(weight)


def test_merge_refuses_4bit_weights_and_works_after_dequantize():
    model = small_llama(layers=1)
    quantize_nf4(model)
    handle = with_lora(model)
    x = ids()
    expected = model(input_ids=x).logits
    with pytest.raises(MergeError, match=r"q_proj\.lora .*quantized \(NF4Tensor\).*quantize\.dequantize"):
        handle.merge()
    with pytest.raises(MergeError, match="dequantize"):
        handle.merge_and_unload()
    assert not any(d.module.merged for d in handle.deltas())
    assert len(dequantize(model)) == 7
    assert not any(is_quantized(p) for p in model.parameters())
    torch.testing.assert_close(model(input_ids=x).logits, expected, rtol=1e-5, atol=1e-5)
    plain = handle.merge_and_unload()
    torch.testing.assert_close(plain(input_ids=x).logits, expected, rtol=1e-4, atol=1e-4)


def test_bitfit_merges_into_the_bias_of_a_4bit_layer():
    model = nn.Sequential(nn.Linear(256, 256))
    quantize_nf4(model)
    handle = attach(model, "bitfit", targets="0")
    handle.merge()
    assert handle.merged


def test_residual_lora_inits_are_refused_on_nf4():
    model = small_llama(layers=1)
    quantize_nf4(model)
    with pytest.raises(UnsupportedModuleError, match="4-bit"):
        attach(model, "lora", targets="q_proj", init="pissa")
    other = small_llama(layers=1)
    attach(other, "lora", targets="q_proj", init="olora", r=4)
    with pytest.raises(UnsupportedModuleError, match="init='pissa'/'olora'"):
        quantize_nf4(other)
    assert not any(isinstance(m, NF4Linear) for m in other.modules())


def test_fingerprint_records_logical_shapes_and_samples_no_4bit_tensor():
    model, plain, other = small_llama(layers=1), small_llama(layers=1), small_llama(layers=1, seed=5)
    quantize_nf4(model)
    for m in (model, plain, other):
        with_lora(m)  # frozen: values are sampled from frozen parameters only
    record = fingerprint(model)
    assert record["shapes"] == fingerprint(plain)["shapes"]
    assert record["samples"] and not any(is_quantized(model.get_parameter(k)) for k in record["samples"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compare_fingerprint(record, plain) == []
        assert compare_fingerprint(fingerprint(plain), model) == []  # sampled float weights now 4-bit: not compared
    assert compare_fingerprint(fingerprint(other), model)  # other float weights (embeddings, head) still warn


def test_save_and_load_delta_between_nf4_and_plain_backbones(tmp_path):
    model = small_llama(layers=2)
    quantize_nf4(model)
    handle = with_lora(model)
    save_delta(model, tmp_path / "delta")
    saved = handle.delta_state_dict()
    assert saved and all(".lora." in k for k in saved)
    x = ids()

    again = small_llama(layers=2)
    quantize_nf4(again)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_delta(again, tmp_path / "delta")
        torch.testing.assert_close(again(input_ids=x).logits, model(input_ids=x).logits)
        plain = small_llama(layers=2)
        load_delta(plain, tmp_path / "delta")  # same names and logical shapes
    for key, value in DeltaModel(plain).delta_state_dict().items():
        torch.testing.assert_close(value, saved[key])

    # and back: a delta trained on the float backbone loads into the 4-bit one
    save_delta(plain, tmp_path / "plain")
    four_bit = small_llama(layers=2)
    quantize_nf4(four_bit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_delta(four_bit, tmp_path / "plain")
    torch.testing.assert_close(four_bit(input_ids=x).logits, again(input_ids=x).logits)


class QLoraModule(pl.LightningModule):
    """A causal LM whose backbone is built and quantized in ``configure_model``; one fixed batch."""

    def __init__(self, quantize: bool = True):
        super().__init__()
        self.model = None
        self.quantize = quantize
        self.ids = torch.randint(0, 99, (4, 16), generator=torch.Generator().manual_seed(0))
        self.losses = []

    def configure_model(self):
        if self.model is None:
            self.model = small_llama(layers=2).train()
            if self.quantize:
                quantize_nf4(self.model)

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        self.losses.append(loss.item())
        return loss

    def train_dataloader(self):
        return torch.utils.data.DataLoader(range(30), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_lightning_fit_on_an_nf4_backbone_writes_delta_only_checkpoints(tmp_path, precision):
    module = QLoraModule()
    t = trainer(tmp_path, [DeltaCallback(LoraConfig(r=8, targets=LORA_TARGETS))], precision=precision, max_epochs=1)
    t.fit(module)
    assert len(module.losses) == 30 and all(torch.isfinite(torch.tensor(module.losses)))
    assert sum(module.losses[-5:]) < 0.8 * sum(module.losses[:5])
    print(f"{precision}: loss {sum(module.losses[:5]) / 5:.3f} (first 5) -> {sum(module.losses[-5:]) / 5:.3f} (last 5)")
    weights = [p for n, p in module.model.named_parameters() if n.endswith("proj.weight")]
    assert weights and all(is_quantized(w) and not holds_dense_copy(w) for w in weights)  # Lightning's cast kept them
    assert {p.dtype for p in DeltaModel(module.model).delta_parameters()} == {torch.float32}

    path = tmp_path / "last.ckpt"
    t.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert state and all(".lora." in k for k in state)
    assert len(state) == 2 * 2 * len(LORA_TARGETS)  # A and B per target per layer

    plain = QLoraModule(quantize=False)  # the float backbone takes the delta trained on the 4-bit one
    plain.configure_model()
    load_delta(plain, path)
    trained = DeltaModel(module.model).delta_state_dict()
    for key, value in DeltaModel(plain.model).delta_state_dict().items():
        torch.testing.assert_close(value, trained[key].float())
