"""Initialisation from training data (LoRA ``init="eva"``), run by DeltaCallback at fit start."""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as pl
import peft
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lightning_delta import DeltaCallback, DeltaConfigError, DeltaModel, LoraConfig, trainable_parameters
from lightning_delta.data_inits import IncrementalPCA, signed_svd
from lightning_helpers import launch_script, script_report, trainer
from models import tiny_llama

TARGETS = ["q_proj", "v_proj"]


def lm_batches(n: int, batch: int = 4, seq: int = 10, seed: int = 0, vocab: int = 99) -> list[dict]:
    """Causal-LM batches with right padding (attention_mask 0) and prompt tokens masked out of the labels."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (batch, seq), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :2] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


class LM(pl.LightningModule):
    def __init__(self, model) -> None:
        super().__init__()
        self.model, self.seen = model, []

    def on_train_batch_start(self, batch, batch_idx):  # the loop's batches only (not those EVA looked at)
        self.seen.append(batch["input_ids"][:, 0].clone())

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(trainable_parameters(self), lr=1e-2)


class FirstValues(Callback):
    """The delta tensors as training starts (after DeltaCallback's on_train_start)."""

    def on_train_start(self, trainer, pl_module):
        self.values = {k: v.clone() for k, v in DeltaModel(pl_module.model).delta_state_dict().items()}


def fit(model, config, batches, *, epochs=1, shuffle=False, resume=None, root=None, steps=-1):
    module, probe = LM(model), FirstValues()
    run = trainer(root, [DeltaCallback(config), probe], max_epochs=epochs, max_steps=steps)
    loader = DataLoader(batches, batch_size=None, shuffle=shuffle)
    run.fit(module, loader, ckpt_path=resume, weights_only=True)
    return module, probe.values, run


def test_incremental_pca_equals_the_pca_of_all_rows_seen():
    """Keeping every direction (k = width) the update is exact: the running mean's correction included."""
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, 6, generator=gen) @ torch.randn(6, 6, generator=gen) + 3.0 for n in (9, 5, 12)]
    pca = IncrementalPCA(6)
    for chunk in chunks:
        pca.update(chunk)
    rows = torch.cat(chunks)
    _, singular, vh = torch.linalg.svd(rows - rows.mean(0), full_matrices=False)
    torch.testing.assert_close(pca.singular, singular, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pca.mean, rows.mean(0), rtol=1e-5, atol=1e-5)
    for got, want in zip(pca.components, vh):  # the same directions (a sign each)
        assert abs(float(got @ want)) > 1 - 1e-5


def exact_svd(matrix, q=6, niter=2, M=None):
    """``torch.svd_lowrank``'s contract, computed exactly."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u, s, vh.T


def test_eva_equals_peft_on_the_same_batches(tmp_path, monkeypatch):
    """PEFT's incremental PCA uses a randomized SVD; made exact here, its values are the definition's. A small
    vocabulary gives the inputs a few clear directions, so every target converges within the batches given."""
    torch.manual_seed(0)
    base = tiny_llama()
    batches = lm_batches(16, vocab=7)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="eva",
        eva_config=peft.EvaConfig(rho=1.0, tau=0.95)))
    with monkeypatch.context() as patch:
        patch.setattr(torch, "svd_lowrank", exact_svd)
        peft.initialize_lora_eva_weights(theirs, dataloader=batches, show_progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # converged: no warning
        _, first, _ = fit(copy.deepcopy(base), LoraConfig(r=4, alpha=8, targets=TARGETS, init="eva", init_batches=16,
                                                         eva_tau=0.95), batches, root=tmp_path, steps=1)
    compared = 0
    for name, module in theirs.named_modules():
        if name.endswith(tuple(TARGETS)) and hasattr(module, "lora_A"):
            path = name.removeprefix("base_model.model.")
            torch.testing.assert_close(first[f"{path}.lora.A"], module.lora_A["default"].weight, rtol=1e-4, atol=1e-5)
            assert torch.equal(first[f"{path}.lora.B"], torch.zeros_like(first[f"{path}.lora.B"]))
            compared += 1
    assert compared == 4


def signed_exact_svd(matrix, q=6, niter=2, M=None):
    """``torch.svd_lowrank``'s contract, exact, with the library's sign per singular pair."""
    u, s, vh = signed_svd(matrix)
    return u, s, vh.T


def test_lora_ga_equals_peft_on_the_same_batches_and_starts_as_the_backbone(tmp_path, monkeypatch):
    """PEFT's randomized SVD (arbitrary signs) made exact with the library's signs: the values are the definition's.
    PEFT subtracts the start from the weight; here it is subtracted beside it: the same function."""
    torch.manual_seed(0)
    base = tiny_llama()
    batches = lm_batches(3)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="lora_ga",
                             lora_ga_config=peft.LoraGAConfig())
    copied = copy.deepcopy(base)

    def train_step():
        for batch in batches:
            copied(**batch).loss.backward()

    with monkeypatch.context() as patch:
        patch.setattr(torch, "svd_lowrank", signed_exact_svd)
        peft.tuners.lora.loraga.preprocess_loraga(copied, config, train_step)
        theirs = peft.get_peft_model(copied, config).eval()
    module, first, _ = fit(copy.deepcopy(base), LoraConfig(r=4, alpha=8, targets=TARGETS, init="lora_ga",
                                                          init_batches=3), batches, root=tmp_path, steps=1)
    compared = 0
    for name, layer in theirs.named_modules():
        if name.endswith(tuple(TARGETS)) and hasattr(layer, "lora_A"):
            path = name.removeprefix("base_model.model.")
            for ours, peft_name in (("A", "lora_A"), ("B", "lora_B")):
                want = getattr(layer, peft_name)["default"].weight
                torch.testing.assert_close(first[f"{path}.lora.{ours}"], want, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(first[f"{path}.lora.{ours}0"], want, rtol=1e-4, atol=1e-5)
            compared += 1
    assert compared == 4
    ids = batches[0]["input_ids"]
    fresh = copy.deepcopy(base).eval()
    attached = copy.deepcopy(base)
    handle = DeltaModel(attached).attach(LoraConfig(r=4, alpha=8, targets=TARGETS, init="lora_ga")).freeze_backbone()
    handle.load_delta_state_dict(first)
    with torch.no_grad():
        torch.testing.assert_close(attached.eval()(input_ids=ids).logits, fresh(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)  # identity at the start
        torch.testing.assert_close(theirs(input_ids=ids).logits, fresh(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_lora_ga_checkpoint_holds_its_start_and_reloads_the_same_function(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama()
    config = LoraConfig(r=4, targets=TARGETS, init="lora_ga", init_batches=2)
    module, _, run = fit(copy.deepcopy(base), config, lm_batches(4), root=tmp_path, steps=3)
    run.save_checkpoint(tmp_path / "ga.ckpt")
    state = torch.load(tmp_path / "ga.ckpt", weights_only=True)["state_dict"]
    assert "model.model.layers.0.self_attn.q_proj.lora.A0" in state and len(state) == 16  # A, B, A0, B0 x 4
    fresh = copy.deepcopy(base)
    DeltaModel(fresh).attach(config).freeze_backbone().load_delta_state_dict(
        {k.removeprefix("model."): v for k, v in state.items()})
    ids = lm_batches(1)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(input_ids=ids).logits, module.model.eval()(input_ids=ids).logits)
    with pytest.raises(DeltaConfigError, match="how='cat' would drop them"):
        DeltaModel(fresh).combine(["lora"], name="both", how="cat")
    merged = copy.deepcopy(fresh)
    DeltaModel(merged).merge()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, fresh(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_eva_leaves_the_data_order_alone_resumes_exactly_and_does_not_run_again(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama()
    batches = lm_batches(6)
    config = LoraConfig(r=4, targets=TARGETS, init="eva", init_batches=3)
    torch.manual_seed(0)  # the same global state before each fit: the shuffled order depends on it
    straight, first, _ = fit(copy.deepcopy(base), config, batches, shuffle=True, epochs=2, root=tmp_path / "a")
    torch.manual_seed(0)
    plain, _, _ = fit(copy.deepcopy(base), LoraConfig(r=4, targets=TARGETS), batches, shuffle=True, epochs=2,
                      root=tmp_path / "plain")
    assert len(straight.seen) == len(plain.seen) == 12
    assert all(torch.equal(a, b) for a, b in zip(straight.seen, plain.seen))  # EVA's look changed no draw
    assert not torch.allclose(first["model.layers.0.self_attn.q_proj.lora.A"],
                              DeltaModel(plain.model).delta_state_dict()["model.layers.0.self_attn.q_proj.lora.A"])
    torch.manual_seed(0)
    _, _, run = fit(copy.deepcopy(base), config, batches, shuffle=True, epochs=1, root=tmp_path / "b")
    run.save_checkpoint(tmp_path / "half.ckpt")
    saved = torch.load(tmp_path / "half.ckpt", weights_only=True)["state_dict"]
    resumed, at_start, _ = fit(copy.deepcopy(base), config, batches, shuffle=True, epochs=2, root=tmp_path / "c",
                               resume=tmp_path / "half.ckpt")
    for key, value in at_start.items():  # the checkpoint's values, not a second EVA
        torch.testing.assert_close(value, saved[f"model.{key}"], rtol=0, atol=0)
    want, got = DeltaModel(straight.model).delta_state_dict(), DeltaModel(resumed.model).delta_state_dict()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)


class TwoLoaders(LM):
    """``training_step`` gets one batch of each of two train dataloaders (Lightning's combined batch)."""

    def on_train_batch_start(self, batch, batch_idx):
        self.seen.append(batch["a"]["input_ids"][:, 0].clone())

    def training_step(self, batch, batch_idx):
        return self.model(**batch["a"]).loss + self.model(**batch["b"]).loss


def test_several_train_dataloaders_are_combined_as_the_fit_loop_combines_them(tmp_path):
    torch.manual_seed(0)
    module = TwoLoaders(tiny_llama())
    batches = lm_batches(4)
    probe = FirstValues()
    run = trainer(tmp_path, [DeltaCallback(LoraConfig(r=4, targets=TARGETS, init="lora_ga", init_batches=2)),
                             probe], max_steps=1)
    run.fit(module, {"a": DataLoader(batches, batch_size=None), "b": DataLoader(batches[:2], batch_size=None)})
    start = probe.values["model.layers.0.self_attn.q_proj.lora.A0"]
    assert start.abs().sum() > 0 and torch.equal(start, probe.values["model.layers.0.self_attn.q_proj.lora.A"])


def test_eva_configs_are_checked_by_name():
    for kwargs, message in [({"init_batches": 0}, "init_batches=0"), ({"eva_tau": 1.5}, "eva_tau=1.5"),
                            ({"init": "evaa"}, "init='evaa'")]:
        with pytest.raises(DeltaConfigError, match=message):
            LoraConfig(**kwargs)


@pytest.mark.parametrize("init", ["eva", "lora_ga"])
def test_two_ddp_processes_give_every_rank_the_factors_of_one_process_on_both_halves(tmp_path, init):
    """EVA gathers the rows of every rank; LoRA-GA averages the ranks' gradients (each half holds as many
    tokens, so that is the gradient of the whole)."""
    for devices in (2, 1):
        done = launch_script("eva_ddp.py", tmp_path / str(devices), devices, init)
        assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp_path / "2" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    single = torch.load(tmp_path / "1" / "rank0.pt", weights_only=True)
    assert set(ranks[0]) == set(single) and any(k.endswith("lora.A") for k in single)
    for key, value in single.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # the same on every rank
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-4, atol=1e-5)


def test_eva_under_fsdp2_on_two_processes_trains_like_one_process(tmp_path):
    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path / "llama")
    two = script_report("fsdp2_train.py", tmp_path / "two", tmp_path / "llama", 2, 1, "--init", "eva")
    one = script_report("fsdp2_train.py", tmp_path / "one", tmp_path / "llama", 1, 1, "--init", "eva")
    default = script_report("fsdp2_train.py", tmp_path / "default", tmp_path / "llama", 1, 1)
    assert two["sharded"] and two["steps"] == one["steps"] == 2
    for key, value in one["state"].items():
        torch.testing.assert_close(two["state"][key], value, rtol=1e-4, atol=1e-5)
    key = "model.layers.0.self_attn.q_proj.lora.A"
    assert not torch.allclose(one["state"][key], default["state"][key], atol=1e-2)  # EVA ran
