"""lightning-delta export / merge / inspect on checkpoints of a short quickstart run on a tiny local BERT."""

import json
from pathlib import Path

import peft
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from lightning_delta import load_delta
from lightning_delta.cli import main
from lightning_delta.tasks import SequenceClassification
from models import bundled_tokenizer, save_tiny

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")


def fit(tmp_path, *extra) -> Path:
    model = save_tiny("bert", tmp_path / "pretrained")
    main(["fit", "--config", QUICKSTART, f"--trainer.default_root_dir={tmp_path / 'run'}",
          "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
          "--trainer.enable_progress_bar=false", "--trainer.logger=false", f"--model.init_args.model={model}",
          "--model.init_args.learning_rate=0.05", "--data.init_args.num_train=96", "--data.init_args.num_val=32",
          *extra])
    (ckpt,) = (tmp_path / "run").rglob("best-*.ckpt")
    return ckpt


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA + classifier checkpoint, and the logits of the model it reloads into."""
    tmp_path = tmp_path_factory.mktemp("lora")
    ckpt = fit(tmp_path)
    reference = SequenceClassification.load_from_checkpoint(ckpt, weights_only=True).model.eval()
    pretrained = AutoModelForSequenceClassification.from_pretrained(tmp_path / "pretrained").eval()
    batch = bundled_tokenizer()(["a fine film", "dull and slow, sadly"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected, plain = reference(**batch).logits, pretrained(**batch).logits
    assert not torch.allclose(expected, plain, atol=1e-4)  # training changed the outputs
    return ckpt, tmp_path / "pretrained", batch, expected


def logits(model, batch):
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_export_to_peft_loads_in_peft_with_the_same_outputs(trained, tmp_path):
    ckpt, pretrained, batch, expected = trained
    main(["export", "--ckpt", str(ckpt), "--to", "peft", str(tmp_path / "adapter")])
    base = AutoModelForSequenceClassification.from_pretrained(pretrained)
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=1e-5, atol=1e-5)


def test_export_to_delta_folder_loads_back(trained, tmp_path):
    ckpt, pretrained, batch, expected = trained
    main(["export", "--ckpt", str(ckpt), "--to", "delta", str(tmp_path / "delta"), "--model", str(pretrained)])
    assert sorted(p.name for p in (tmp_path / "delta").iterdir()) == ["delta.json", "delta.safetensors"]
    model = AutoModelForSequenceClassification.from_pretrained(pretrained)
    load_delta(model, tmp_path / "delta")
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)


def test_merge_writes_a_plain_transformers_model_with_the_same_outputs(trained, tmp_path):
    ckpt, _, batch, expected = trained
    main(["merge", "--ckpt", str(ckpt), "--out", str(tmp_path / "merged")])
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert not any("lora" in k for k in merged.state_dict())
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()
    torch.testing.assert_close(logits(merged, batch), expected, rtol=1e-5, atol=1e-5)


def test_merge_refuses_deltas_that_cannot_merge_and_says_what_to_do(tmp_path, capsys):
    ckpt = fit(tmp_path, "--delta.method=lightning_delta.AdapterConfig")
    with pytest.raises(SystemExit) as exit_:
        main(["merge", "--ckpt", str(ckpt), "--out", str(tmp_path / "merged")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "'adapter' has no merge" in err and "merge" in err
    assert not (tmp_path / "merged").exists()


def test_commands_name_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--ckpt", str(tmp_path / "missing.ckpt"), "--to", "peft", str(tmp_path / "out")])
    assert exit_.value.code == 2 and "missing.ckpt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--ckpt", "x.ckpt", "--to", "onnx", str(tmp_path / "out")])
    assert exit_.value.code == 2 and "invalid choice: 'onnx'" in capsys.readouterr().err


def test_inspect_folds_blocks_and_marks_deltas(tmp_path, capsys):
    model = save_tiny("bert", tmp_path / "pretrained")
    main(["inspect", "--config", QUICKSTART, "--", f"--model.init_args.model={model}",
          f"--trainer.default_root_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert "0-1 (2 x BertLayer)" in out  # two identical blocks, one line
    assert "query (Linear)" in out and "lora [delta lora]" in out
    assert "classifier (Linear)" in out and "trainable" in out
    assert "trainable " in out.splitlines()[-1] and "lora: " in out.splitlines()[-1]

    main(["inspect", "--model", model, "--auto-class", "AutoModelForSequenceClassification", "--method", "ia3",
          "--trainable", "classifier", "--json"])
    report = json.loads(capsys.readouterr().out)
    tree, summary = report["tree"], report["summary"]
    assert tree["type"] == "BertForSequenceClassification"
    assert summary["per_delta"]["ia3"] > 0 and summary["trainable"] == tree["trainable"]
    encoder = tree["children"][0]["children"][1]
    (layers,) = encoder["children"][0]["children"]  # bert.encoder.layer: its blocks in one node
    assert layers["name"] == "0-1" and layers["repeat"] == 2
    assert layers["parameters"] == sum(p.numel() for n, p in AutoModelForSequenceClassification.from_pretrained(
        model).named_parameters() if n.startswith("bert.encoder.layer.")) + summary["per_delta"]["ia3"]


def test_rich_tree_marks_deltas():
    from rich.console import Console

    from lightning_delta import attach
    from lightning_delta.tree import model_tree, render_rich
    from models import tiny_llama

    model = tiny_llama()
    attach(model, "lora", r=2).freeze_backbone()
    console = Console(record=True, width=200, color_system=None)
    console.print(render_rich(model_tree(model)))
    text = console.export_text()
    assert "0-1 (2 x LlamaDecoderLayer)" in text and "lora [delta lora]" in text
