"""save_delta / load_delta folders: safetensors + JSON, no pickle; into the backbone or its holder."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lightning_delta import CheckpointReadError, DeltaModel, attach, load_delta, save_delta
from lightning_helpers import Classifier, loader, save_pretrained_bert


def test_round_trip_into_the_backbone_and_into_a_lightning_module(tmp_path):
    source = save_pretrained_bert(tmp_path / "bert")
    trained = Classifier(source).eval()
    handle = attach(trained.model, "lora", r=4).freeze_backbone(trainable="classifier")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in handle.delta_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    folder = save_delta(trained.model, tmp_path / "delta")
    assert set(load_file(str(folder / "delta.safetensors"))) == set(handle.delta_state_dict())
    assert json.loads((folder / "delta.json").read_text())["specs"][0]["method"] == "lora"
    ids = loader().dataset.tensors[0]
    expected = trained(ids)

    from transformers import AutoModelForSequenceClassification

    bare = AutoModelForSequenceClassification.from_pretrained(source).eval()
    load_delta(bare, folder)
    torch.testing.assert_close(bare(input_ids=ids).logits, expected)
    holder = Classifier(source).eval()  # the folder's keys are relative to the backbone inside it
    load_delta(holder, folder)
    torch.testing.assert_close(holder(ids), expected)
    assert DeltaModel(holder.model).configs["lora"].r == 4


def test_a_broken_folder_is_a_clear_error(tmp_path):
    (tmp_path / "delta").mkdir()
    (tmp_path / "delta" / "delta.json").write_text("{}")
    with pytest.raises(CheckpointReadError, match="delta.safetensors"):
        load_delta(Classifier(save_pretrained_bert(tmp_path / "bert")), tmp_path / "delta")
