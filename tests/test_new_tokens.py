"""Trainable new-token embeddings: only the new rows train, the checkpoint holds only them, load restores."""

import pytest
import torch

from lightning_delta import (DeltaConfigError, DeltaModel, LoraConfig, NewTokensConfig, attach, load_delta,
                             save_delta)
from lightning_delta.optim import param_groups
from models import tiny_gpt2, tiny_llama

NEW = 3  # tokens added to the 99-token vocabulary of the tiny models


def resized(family: str, seed: int = 0):
    """The same tiny backbone every time, with NEW rows added; their initial values are drawn from ``seed``."""
    torch.manual_seed(0)
    model = {"llama": tiny_llama, "gpt2": tiny_gpt2}[family]()
    torch.manual_seed(seed)
    model.resize_token_embeddings(99 + NEW)
    return model


def batch(seed: int = 3):
    """Sequences that use the new tokens (ids 99..101) as inputs and as targets."""
    ids = torch.randint(1, 99 + NEW, (4, 12), generator=torch.Generator().manual_seed(seed))
    ids[:, ::3] = torch.arange(99, 99 + NEW).repeat(4, 2)[:, : ids[:, ::3].shape[1]]
    return {"input_ids": ids, "labels": ids.clone()}


def train(model, steps: int = 15, lr: float = 5e-2) -> list[float]:
    optimizer = torch.optim.AdamW(param_groups(model, lr=lr))
    losses = []
    for _ in range(steps):
        loss = model(**batch()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # untied head / head tied to the embedding
def test_only_the_new_rows_train_and_the_model_is_unchanged_at_init(family):
    model = resized(family)
    tied = family == "gpt2"
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert (head.weight is embedding.weight) == tied
    before_weights = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = batch()
    with torch.no_grad():
        reference = model(**inputs).logits
    handle = attach(model, NewTokensConfig(num_new_tokens=NEW)).freeze_backbone()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference)  # identity at init (head: same rows, own matmul)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == NEW * 32 * (1 if tied else 2)
    losses = train(model)
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, before_weights[k]) for k, v in model.state_dict().items() if k in before_weights)
    new_rows = embedding.new_tokens.weight
    assert not torch.allclose(new_rows, before_weights[next(k for k in before_weights if "wte" in k or
                                                               "embed_tokens" in k)][99:])
    # the effective embedding: old rows as before, new rows from the delta
    with torch.no_grad():
        ids = torch.arange(99 + NEW)
        effective = embedding(ids)
        torch.testing.assert_close(effective[:99], embedding.weight[:99])
        torch.testing.assert_close(effective[99:], new_rows)
    # gradients reach the new rows only
    model(**batch()).loss.backward()
    assert new_rows.grad is not None and new_rows.grad.abs().sum() > 0
    assert embedding.weight.grad is None and head.weight.grad is None
    assert handle.summary().trainable == NEW * 32 * (1 if tied else 2)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_checkpoint_holds_only_the_new_rows_and_loading_restores_the_outputs(family, tmp_path):
    model = resized(family)
    attach(model, [NewTokensConfig(num_new_tokens=NEW), LoraConfig(r=2)]).freeze_backbone()
    train(model)
    state = DeltaModel(model).delta_state_dict()
    new_keys = sorted(k for k in state if ".new_tokens." in k)
    tied = family == "gpt2"
    assert [tuple(state[k].shape) for k in new_keys] == [(NEW, 32)] * (1 if tied else 2)
    lora_numel = sum(v.numel() for k, v in state.items() if ".lora." in k)
    assert set(state) == set(new_keys) | {k for k in state if ".lora." in k}
    save_delta(model, tmp_path / "delta")
    size = (tmp_path / "delta" / "delta.safetensors").stat().st_size
    payload = (NEW * 32 * (1 if tied else 2) + lora_numel) * 4
    print(f"{family}: delta.safetensors {size} bytes, tensors {payload} bytes")
    assert payload <= size < payload + 4096  # the header only on top

    fresh = resized(family, seed=1)  # other random new rows: the delta replaces them
    assert not torch.allclose(fresh.get_input_embeddings().weight[99:], model.get_input_embeddings().weight[99:])
    load_delta(fresh, tmp_path / "delta")
    inputs = batch(seed=9)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_writes_the_rows_and_unmerge_restores_the_weights(family):
    model = resized(family)
    handle = attach(model, NewTokensConfig(token_ids=[99, 101]))
    with torch.no_grad():
        for d in handle.deltas():
            d.module.rows().add_(torch.randn(d.module.rows().shape))
    original = {k: v.clone() for k, v in model.state_dict().items() if ".new_tokens." not in k}
    inputs = batch()
    with torch.no_grad():
        expected = model(**inputs).logits
        handle.merge()
        torch.testing.assert_close(model(**inputs).logits, expected)
        embedding = model.get_input_embeddings()
        assert torch.equal(embedding.weight[[99, 101]], embedding.new_tokens.weight)
        handle.unmerge()
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items() if k in original)


def test_optimizer_groups_do_not_decay_the_new_rows():
    model = resized("llama")
    attach(model, [NewTokensConfig(num_new_tokens=NEW), LoraConfig(r=2)]).freeze_backbone()
    groups = param_groups(model, lr=1e-3, weight_decay=0.1)
    rows = model.get_input_embeddings().new_tokens.weight
    assert [g["weight_decay"] for g in groups if any(p is rows for p in g["params"])] == [0.0]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, "exactly one of num_new_tokens"),
    ({"num_new_tokens": 2, "token_ids": [100]}, "exactly one of num_new_tokens"),
    ({"num_new_tokens": 0}, "num_new_tokens=0"),
    ({"token_ids": [100, 100]}, "distinct"),
])
def test_config_is_checked(kwargs, message):
    with pytest.raises(DeltaConfigError, match=message):
        NewTokensConfig(**kwargs)


def test_ids_outside_the_vocabulary_say_to_resize_first():
    model = tiny_llama()
    with pytest.raises(DeltaConfigError, match=r"\[120\] are outside the 99 rows.*resize_token_embeddings"):
        attach(model, NewTokensConfig(token_ids=[98, 120]))


def test_lightning_fit_with_added_special_tokens_saves_only_new_rows_and_lora(tmp_path):
    """SFT where responses use two added special tokens: the task resizes, the callback trains rows + LoRA."""
    import json

    from transformers import AutoTokenizer

    from lightning_delta import DeltaCallback
    from lightning_delta.checkpoint import META_KEY
    from lightning_delta.data import InstructionData
    from lightning_delta.tasks import CausalLanguageModeling
    from lightning_helpers import trainer
    from models import save_tiny

    path = save_tiny("llama", tmp_path / "llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<call>", "</call>"]})
    tokenizer.save_pretrained(path)

    class WithNewTokens(CausalLanguageModeling):
        def __init__(self, model: str, **kwargs) -> None:
            super().__init__(model, **kwargs)
            self.model.resize_token_embeddings(len(AutoTokenizer.from_pretrained(model)))

    rows = [{"prompt": f"weather in city {i}", "response": f"<call> weather {i} </call>"} for i in range(8)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = InstructionData(data_files={"train": str(tmp_path / "train.jsonl")}, batch_size=4, max_length=32)
    model = WithNewTokens(path, learning_rate=2e-2)
    embedding = model.model.get_input_embeddings()
    old_rows = embedding.weight[:-2].clone()
    t = trainer(tmp_path, [DeltaCallback([NewTokensConfig(num_new_tokens=2), LoraConfig(r=2)])], max_epochs=2)
    t.fit(model, data)
    assert torch.equal(embedding.weight[:-2], old_rows)
    assert not torch.equal(embedding.new_tokens.weight, embedding.weight[-2:])  # trained away from the init
    t.save_checkpoint(tmp_path / "sft.ckpt")
    saved = torch.load(tmp_path / "sft.ckpt", weights_only=True)
    state = saved["state_dict"]
    new = {k: v.shape for k, v in state.items() if ".new_tokens." in k}
    assert new == {"model.model.embed_tokens.new_tokens.weight": (2, 32), "model.lm_head.new_tokens.weight": (2, 32)}
    assert all(".new_tokens." in k or ".lora." in k for k in state)
    assert [s["method"] for s in saved[META_KEY]["specs"]] == ["new_tokens", "lora"]
    reloaded = WithNewTokens.load_from_checkpoint(tmp_path / "sft.ckpt").eval()
    ids = torch.tensor([[101, len(tokenizer) - 2, 2000, len(tokenizer) - 1, 102]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(input_ids=ids).logits, model.eval().model(input_ids=ids).logits,
                                   rtol=0, atol=0)
