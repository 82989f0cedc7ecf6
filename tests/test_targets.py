"""Addressing rules: exact names, dot-boundary suffixes, regexes, all-linear, presets and errors."""

import pytest
import torch
from torch import nn

from lightning_delta import TargetError, UnsupportedModuleError, attach
from lightning_delta.methods.lora import LoraConfig
from lightning_delta.targets import matches, resolve_targets
from models import FAMILIES, PlainNet, tiny_bert, tiny_gpt2


@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        ("encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.query", True),
        ("encoder.layer.0.attention.self.query", "attention.self.query", True),
        ("encoder.layer.0.attention.self.query", "query", True),
        ("encoder.layer.0.attention.self.myquery", "query", False),
        ("encoder.layer.0.attention.self.query", "self.que", False),
        ("encoder.layer.0.attention.self.query", "layer.0", False),
        ("encoder.layer.10.attention.self.query", r"re:.*layer\.1\..*query", False),
        ("encoder.layer.1.attention.self.query", r"re:.*layer\.1\..*query", True),
        ("encoder.layer.1.attention.self.query", "re:query", False),  # full match, not search
        ("query", "query", True),
    ],
)
def test_match_rules(name, pattern, expected):
    assert matches(name, pattern) is expected


def lora_targets(model, patterns, exclude=()):
    cfg = LoraConfig()
    return resolve_targets(model, patterns, cfg.supports, exclude=exclude, method="lora")


def test_suffix_matches_every_layer_and_keeps_model_order():
    model = tiny_bert(layers=3)
    names = lora_targets(model, ["value", "query"])
    assert names == [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(3) for p in ("query", "value")]


def test_exclude_removes_matches():
    model = tiny_bert(layers=3)
    names = lora_targets(model, ["query"], exclude=[r"re:.*layer\.0\..*"])
    assert names == ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.2.attention.self.query"]


def test_all_linear_takes_every_linear_but_the_head():
    model = tiny_gpt2()
    names = lora_targets(model, "all-linear")
    expected = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert names == expected and "lm_head" not in names
    bert = tiny_bert()
    bert_names = lora_targets(bert, "all-linear")
    assert "classifier" not in bert_names
    assert bert_names == [n for n, m in bert.named_modules() if isinstance(m, nn.Linear) and n != "classifier"]


def test_no_match_names_close_modules_and_presets():
    with pytest.raises(TargetError) as err:
        lora_targets(tiny_bert(), ["querry"])
    msg = str(err.value)
    assert "'querry'" in msg and "attention.self.query" in msg and "Presets" in msg and "gpt2" in msg


def test_one_bad_pattern_among_good_ones_is_an_error():
    with pytest.raises(TargetError, match="'vlaue'"):
        lora_targets(tiny_bert(), ["query", "vlaue"])


def test_everything_excluded_is_an_error_of_its_own():
    with pytest.raises(TargetError, match="excluded"):
        lora_targets(tiny_bert(), ["query"], exclude=["query"])


def test_unsupported_module_type_is_named():
    with pytest.raises(UnsupportedModuleError) as err:
        lora_targets(tiny_bert(), ["attention.self"])
    assert "BertSelfAttention" in str(err.value) and "bert.encoder.layer.0.attention.self" in str(err.value)


@pytest.mark.parametrize(("family", "count"), [("bert", 4), ("gpt2", 2), ("llama", 4), ("t5", 12)])
def test_presets_attach_to_every_family(family, count):
    model = FAMILIES[family]()  # 2 layers each; T5 has encoder self-, decoder self- and cross-attention
    handle = attach(model, "lora")
    assert len(handle.deltas()) == count
    assert all(d.target_path.rsplit(".", 1)[-1] in {"query", "value", "c_attn", "q_proj", "v_proj", "q", "v"}
               for d in handle.deltas())


def test_plain_module_without_preset_says_how_to_fix():
    with pytest.raises(TargetError, match="targets explicitly"):
        attach(PlainNet(), "lora")


def test_modules_inside_deltas_are_never_targets():
    model = PlainNet()
    attach(model, "lora", targets="all-linear", dropout=0.1)  # each LoRA holds a Dropout child
    assert any(n.endswith("lora.dropout") for n, _ in model.named_modules())
    with pytest.raises(TargetError):
        attach(model, "bitfit", targets="re:.*dropout")
    names = [d.target_path for d in attach(model, "lora", targets="all-linear", name="second").deltas("second")]
    assert names == ["body.0", "body.2"]  # the head is left out of all-linear


def test_patterns_are_not_mutated():
    patterns = ["query", "value"]
    exclude = ["layer.1.attention.self.query"]
    attach(tiny_bert(), "lora", targets=patterns, exclude=exclude)
    assert patterns == ["query", "value"] and exclude == ["layer.1.attention.self.query"]


def test_bad_pattern_type_is_rejected():
    with pytest.raises(TargetError, match="non-empty strings"):
        lora_targets(tiny_bert(), ["query", ""])
    assert torch.is_tensor(torch.zeros(1))
