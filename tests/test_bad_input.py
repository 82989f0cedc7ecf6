"""The bad-input matrix: each mistake raises a clear error naming the bad value and the fix,
before anything is changed."""

import json

import pytest
import torch

from lightning_delta import (
    BitFitConfig,
    CheckpointReadError,
    DeltaConfigError,
    DeltaError,
    DeltaModel,
    DeltaStateError,
    LoraConfig,
    MergeError,
    TargetError,
    UnsupportedModuleError,
    attach,
    load_delta,
)
from lightning_delta.data import TextClassificationData
from models import tiny_bert


def lora_model(layers=2):
    torch.manual_seed(0)
    model = tiny_bert(layers=layers)
    attach(model, "lora", r=2).freeze_backbone(trainable="classifier")
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    model = lora_model()
    state = DeltaModel(model).delta_state_dict()
    meta_less = {"state_dict": state}
    torch.save(meta_less, root / "delta.ckpt")
    data = (root / "delta.ckpt").read_bytes()
    (root / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    torch.save({"state_dict": tiny_bert().state_dict()}, root / "full.ckpt")
    bitfit = tiny_bert()
    attach(bitfit, "bitfit").freeze_backbone()
    torch.save({"state_dict": DeltaModel(bitfit).delta_state_dict()}, root / "bitfit.ckpt")
    wide = tiny_bert(hidden=48)
    attach(wide, "lora", r=2).freeze_backbone()
    torch.save({"state_dict": DeltaModel(wide).delta_state_dict()}, root / "wide.ckpt")
    (root / "train.jsonl").write_text(json.dumps({"text": "x", "sentiment": 1}))
    return root


def load_file(name, layers=2):
    def act(model, files):
        state = torch.load(files / name, weights_only=True)["state_dict"] if name != "truncated.ckpt" else None
        if state is None:
            return load_delta(model, files / name, specs=[LoraConfig(r=2, name="lora")], trainable=["classifier"])
        return DeltaModel(model).load_delta_state_dict(state)
    return act


CASES = [
    ("unknown method", lambda m, f: attach(m, "lorra"), DeltaConfigError, ["'lorra'", "known methods"]),
    ("unknown hyper-parameter", lambda m, f: attach(m, "lora", rank=4), DeltaConfigError, ["'rank'", "valid ones"]),
    ("r = 0", lambda m, f: attach(m, "lora", r=0), DeltaConfigError, ["r=0", "positive integer"]),
    ("r < 0", lambda m, f: attach(m, "lora", r=-1), DeltaConfigError, ["r=-1", "positive integer"]),
    ("dropout 1", lambda m, f: attach(m, "lora", dropout=1.0), DeltaConfigError, ["dropout=1.0", "[0, 1)"]),
    ("dropout < 0", lambda m, f: attach(m, "lora", dropout=-0.5), DeltaConfigError, ["dropout=-0.5", "[0, 1)"]),
    ("bottleneck 0", lambda m, f: attach(m, "adapter", bottleneck_dim=0), DeltaConfigError,
     ["bottleneck_dim=0", "positive integer"]),
    ("unknown adapter placement", lambda m, f: attach(m, "adapter", placement="after"), DeltaConfigError,
     ["placement='after'", "houlsby"]),
    ("prefix length 0", lambda m, f: attach(m, "prefix", num_virtual_tokens=0), DeltaConfigError,
     ["num_virtual_tokens=0", "positive integer"]),
    ("bad delta dtype", lambda m, f: attach(m, "lora", delta_dtype="fp8"), DeltaConfigError, ["'fp8'", "float32"]),
    ("bad delta name", lambda m, f: attach(m, "lora", name="my.lora"), DeltaConfigError, ["'my.lora'", "identifier"]),
    ("targets match nothing", lambda m, f: attach(m, "lora", targets=["qeury"]), TargetError,
     ["'qeury'", "attention.self.query"]),
    ("everything excluded", lambda m, f: attach(m, "lora", targets="query", exclude="query"), TargetError,
     ["excluded", "loosen"]),
    ("unsupported module type", lambda m, f: attach(m, "lora", targets="attention.output"), UnsupportedModuleError,
     ["BertSelfOutput", "Narrow the target"]),
    ("same name twice", lambda m, f: attach(m, "bitfit", name="lora"), DeltaConfigError,
     ["'lora' is already attached", "name='lora_2'"]),
    ("detach unknown delta", lambda m, f: DeltaModel(m).detach("adapter"), DeltaError, ["'adapter'", "['lora']"]),
    ("trainable matches nothing", lambda m, f: DeltaModel(m).freeze_backbone(trainable="clasifier"), TargetError,
     ["'clasifier'", "classifier"]),
    ("checkpoint of another backbone", load_file("wide.ckpt"), DeltaStateError, ["differ in shape", "(2, 48)"]),
    ("truncated checkpoint", load_file("truncated.ckpt"), CheckpointReadError, ["truncated", "truncated.ckpt"]),
    ("full checkpoint as a delta", load_file("full.ckpt"), DeltaStateError, ["full", "load_state_dict"]),
    ("delta of another method", load_file("bitfit.ckpt"), DeltaStateError, ["bitfit", "no place"]),
]


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            sum(len(m._forward_hooks) for m in model.modules()))


def same(a, b):
    return (a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
            and a[1] == b[1] and a[2] == b[2])


@pytest.mark.parametrize(("case", "act", "error", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_named_and_changes_nothing(files, case, act, error, words):
    model = lora_model()
    before = snapshot(model)
    with pytest.raises(error) as raised:
        act(model, files)
    for word in words:
        assert word in str(raised.value), (word, str(raised.value))
    assert same(snapshot(model), before)


def test_merge_refuses_a_delta_without_merge_and_changes_nothing():
    model = lora_model()
    attach(model, BitFitConfig(targets=["output.dense", "intermediate.dense"]))
    torch.nn.init.normal_(model.bert.encoder.layer[0].output.dense.bitfit.bias)
    model.bert.encoder.layer[0].output.dense.bias = None  # a target without a bias to fold into
    before = snapshot(model)
    with pytest.raises(MergeError, match=r"layer\.0\.output\.dense\.bitfit.*no bias.*merge\(names="):
        DeltaModel(model).merge()
    assert same(snapshot(model), before)


def test_fewer_layer_checkpoint_is_refused_not_half_loaded(files):
    deeper = lora_model(layers=3)
    before = snapshot(deeper)
    state = torch.load(files / "delta.ckpt", weights_only=True)["state_dict"]
    with pytest.raises(DeltaStateError, match=r"lacks 4 .*layer\.2\.attention.*strict=False"):
        DeltaModel(deeper).load_delta_state_dict(state)
    assert same(snapshot(deeper), before)


def test_dataset_without_the_label_column(files):
    data = TextClassificationData(data_files={"train": str(files / "train.jsonl")}, tokenizer="unused")
    with pytest.raises(ValueError, match=r"no column 'label'.*\['text', 'sentiment'\].*label_column="):
        data.setup("fit")

