"""QLoRA with Lightning's BitsandbytesPrecision: the plugin swaps every Linear for a 4-bit layer after
DeltaCallback.setup; the deltas move onto the new layers and stay fp32, heads trained whole stay unquantized.

Lightning's Trainer accepts the plugin on CUDA only, so the CPU tests run the two steps the Trainer runs
(``Callback.setup``, then the plugin's ``convert_module`` and the move to the device) by hand; bitsandbytes
itself quantizes and computes on the CPU. The full Trainer run is a GPU test.
"""

from types import SimpleNamespace

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from lightning.pytorch.plugins import BitsandbytesPrecision  # noqa: E402

from lightning_delta import DeltaCallback, DeltaModel, MergeError, load_delta  # noqa: E402
from lightning_helpers import Classifier, loader, save_pretrained_bert, trainer  # noqa: E402


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_pretrained_bert(tmp_path_factory.mktemp("bert"), hidden=64)


def quantized_setup(model, callback, mode="nf4"):
    """What the Trainer does on its way to fit: callback setup, then the plugin's conversion and device move."""
    plugin = BitsandbytesPrecision(mode, dtype=torch.float32)
    fake_trainer = SimpleNamespace(strategy=SimpleNamespace(precision_plugin=plugin, launcher=None),
                                   precision="32-true")
    callback.setup(fake_trainer, model, "fit")
    return plugin.convert_module(model).to("cpu")


def test_deltas_move_onto_the_4bit_layers_stay_fp32_and_train(source):
    model = quantized_setup(Classifier(source), DeltaCallback("lora", r=4, trainable=["classifier"]))
    query = model.model.bert.encoder.layer[0].attention.self.query
    assert isinstance(query, bnb.nn.Linear4bit) and query.weight.dtype == torch.uint8
    assert query.lora.A.dtype == torch.float32 and query.lora.A.requires_grad
    assert len(query._forward_hooks) == 1  # the delta's hook lives on the new layer
    assert type(model.model.classifier) is torch.nn.Linear  # trained whole: left unquantized
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".lora." in n or n.startswith("model.classifier.")}

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.02)
    ids, labels = next(iter(loader(n=16, batch_size=16)))
    losses = []
    for _ in range(30):
        loss = model.model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) < sum(losses[:5]), losses
    assert query.lora.B.abs().sum() > 0  # gradients flowed through the 4-bit matmul into the delta


def test_delta_checkpoint_of_a_4bit_backbone_loads_into_a_plain_one(source, tmp_path):
    model = quantized_setup(Classifier(source), DeltaCallback("lora", r=4, trainable=["classifier"]))
    with torch.no_grad():
        for d in DeltaModel(model.model).deltas():
            d.module.B.add_(0.1)
    from lightning_delta.checkpoint import META_KEY, checkpoint_metadata

    state = model.state_dict()  # the delta-only hooks strip the 4-bit weights and their quantization state
    assert state and all(".lora." in k or k.startswith("model.classifier.") for k in state)
    ckpt = {"state_dict": state, META_KEY: checkpoint_metadata(model, "model")}
    plain = Classifier(source)
    assert load_delta(plain, ckpt) is plain  # fingerprint: the 4-bit weights recorded their logical shapes
    handle = DeltaModel(plain.model)
    trained = DeltaModel(model.model).delta_state_dict()
    assert handle.delta_state_dict().keys() == trained.keys()
    assert all(torch.equal(trained[k], v) for k, v in handle.delta_state_dict().items())
    ids = next(iter(loader()))[0]
    with torch.no_grad():  # same delta, backbone in 4 bits vs fp32: quantization error only
        quantized = model.model.bert(ids).last_hidden_state
        full = plain.model.bert(ids).last_hidden_state
    assert (quantized - full).norm() / full.norm() < 0.15

    with pytest.raises(MergeError, match="quantized"):
        DeltaModel(model.model).merge()
    handle.merge()  # the floating-point backbone merges


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning accepts BitsandbytesPrecision on CUDA only")
def test_qlora_fit_on_gpu(source, tmp_path):  # pragma: no cover - GPU machines only
    model = Classifier(source)
    plugin = BitsandbytesPrecision("nf4-dq", dtype=torch.bfloat16)
    fit = trainer(tmp_path, [DeltaCallback("lora", r=4, trainable=["classifier"])], accelerator="cuda",
                  max_epochs=3, enable_checkpointing=True, plugins=[plugin])
    fit.fit(model, loader(n=16))
    ckpt = torch.load(fit.checkpoint_callback.best_model_path, weights_only=True)
    assert all(".lora." in k or k.startswith("model.classifier.") for k in ckpt["state_dict"])
    assert model.model.bert.encoder.layer[0].attention.self.query.lora.A.dtype == torch.float32
