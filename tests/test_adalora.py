"""AdaLoRA: PEFT parity (forward, rank allocation), the budget schedule in a Trainer run, ranks in
checkpoints, the orthogonal regulariser's gradients."""

import copy
import warnings

import peft
import pytest
import torch

from lightning_delta import (
    AdaLoraConfig,
    DeltaCallback,
    DeltaConfigError,
    DeltaModel,
    RankAllocator,
    attach,
    load_delta,
    save_delta,
)
from lightning.pytorch.callbacks import Callback
from lightning_delta.peft_format import export_peft
from lightning_helpers import Classifier, LanguageModel, ReloadableClassifier, loader, save_pretrained_bert, trainer
from models import family_inputs, inputs_and_labels, tiny_bert, tiny_gpt2

FAMILY = {"bert": (tiny_bert, ["query", "value"], {}),
          "gpt2": (tiny_gpt2, ["c_attn", "c_fc"], {"fan_in_fan_out": True})}
PEFT_NAMES = (("A", "lora_A"), ("E", "lora_E"), ("B", "lora_B"))


def peft_twin(base, handle, targets, **kw):
    """PEFT's AdaLoRA on the same backbone, holding our A, E and B."""
    config = next(iter(handle.configs.values()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(
            init_r=config.init_r, target_r=config.target_r, lora_alpha=config.alpha, target_modules=targets,
            total_step=config.total_step, tinit=config.tinit, tfinal=config.tfinal, deltaT=config.deltaT,
            beta1=config.beta1, beta2=config.beta2, orth_reg_weight=config.orth_reg_weight, lora_dropout=0.0, **kw))
    state = {}
    for d in handle.deltas():
        for ours, theirs in PEFT_NAMES:
            state[f"base_model.model.{d.target_path}.{theirs}.default"] = getattr(d.module, ours).detach().clone()
    assert not twin.load_state_dict(state, strict=False).unexpected_keys
    return twin


def randomize(handle, seed=0, size=0.5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.delta_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * size)


@pytest.mark.parametrize(("kwargs", "bad"), [
    ({"target_r": 13}, "target_r=13"), ({"init_r": 0}, "init_r=0"), ({"beta1": 1.0}, "beta1=1.0"),
    ({"total_step": 10, "tinit": 5, "tfinal": 5}, "no budgeting phase"), ({"deltaT": 0}, "deltaT=0"),
    ({"orth_reg_weight": -1}, "orth_reg_weight=-1")])
def test_bad_hyperparameters_are_named(kwargs, bad):
    with pytest.raises(DeltaConfigError, match=bad):
        AdaLoraConfig(**kwargs)


def test_identity_at_init_and_parameter_count():
    model = tiny_bert().eval()
    reference = model(**family_inputs("bert")).logits
    handle = attach(model, "adalora", targets=["query", "value"], init_r=6, target_r=2)
    assert torch.equal(model(**family_inputs("bert")).logits, reference)
    assert handle.summary().delta == 2 * 2 * 6 * (32 + 32 + 1)
    assert all(d.module.rank == 6 for d in handle.deltas())


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_forward_equals_peft_with_the_same_tensors(family):
    make, targets, kw = FAMILY[family]
    base = make().eval()
    model = copy.deepcopy(base)
    handle = attach(model, "adalora", targets=targets, init_r=6, target_r=2, alpha=16, total_step=10)
    randomize(handle)
    twin = peft_twin(base, handle, targets, **kw).eval()
    inputs = family_inputs(family)
    ours = model(**inputs).logits
    assert not torch.allclose(ours, base(**inputs).logits, rtol=0, atol=1e-3)  # the delta matters
    torch.testing.assert_close(ours, twin(**inputs).logits, rtol=0, atol=1e-5)
    # merged: the same outputs at base speed; unmerge restores the weights
    weights = copy.deepcopy(model.state_dict())
    handle.merge()
    torch.testing.assert_close(model(**inputs).logits, ours, rtol=1e-4, atol=1e-4)  # a large update: rounding
    handle.unmerge()
    for key, value in weights.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-6)


def test_orth_reg_gradient_equals_adding_it_to_the_loss():
    model = tiny_bert()
    handle = attach(model, "adalora", targets=["query", "value"], init_r=4, target_r=2, total_step=10,
                    orth_reg_weight=0.3).freeze_backbone()
    randomize(handle, size=0.3)
    inputs, labels = inputs_and_labels("bert")
    allocator = RankAllocator(model, "adalora")
    (model(**inputs, labels=labels).loss + allocator.orth_reg()).backward()
    expected = [p.grad.clone() for p in handle.delta_parameters()]
    model.zero_grad()
    model(**inputs, labels=labels).loss.backward()
    allocator.add_orth_reg_grad()
    for p, grad in zip(handle.delta_parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, grad, rtol=1e-5, atol=1e-7)


def test_rank_allocation_equals_peft_step_by_step():
    """The same SGD steps on both models: the same masks, singular values and budgets at every step."""
    base = tiny_bert()
    model = copy.deepcopy(base)
    config = AdaLoraConfig(targets=["query", "value", "intermediate.dense"], init_r=4, target_r=2, alpha=8,
                           total_step=12, tinit=2, tfinal=3, deltaT=2)
    handle = attach(model, config).freeze_backbone()
    randomize(handle, size=0.2)
    twin = peft_twin(base, handle, config.targets)
    allocator = RankAllocator(model, "adalora")
    ours_opt = torch.optim.SGD(handle.delta_parameters(), lr=0.1)
    peft_params = [p for n, p in twin.named_parameters() if p.requires_grad]
    theirs_opt = torch.optim.SGD(peft_params, lr=0.1)
    inputs, labels = inputs_and_labels("bert")
    for step in range(1, 13):
        model(**inputs, labels=labels).loss.backward()
        allocator.add_orth_reg_grad()
        twin.base_model(**inputs, labels=labels).loss.backward()  # AdaLoraModel.forward adds the regulariser
        ours_opt.step()
        theirs_opt.step()
        budget = allocator.update_and_allocate(step)
        twin.base_model.update_and_allocate(step)
        theirs = twin.state_dict()
        for d in handle.deltas():
            e_peft = theirs[f"base_model.model.{d.target_path}.lora_E.default"]
            assert torch.equal(d.module.E == 0, e_peft == 0), (step, d.target_path)
            torch.testing.assert_close(d.module.E, e_peft, rtol=1e-4, atol=1e-6)
        assert budget == twin.base_model.rankallocator.budget_schedule(step)[0]
        ours_opt.zero_grad()
        theirs_opt.zero_grad()
    assert allocator.kept == allocator.target_budget == 12  # 6 targets, target_r=2


class Record(Callback):
    """Total kept ranks and loss after each optimizer step (runs after DeltaCallback's allocation)."""

    def __init__(self):
        self.kept, self.losses = {}, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        deltas = DeltaModel(pl_module.model).deltas()
        self.kept[trainer.global_step] = sum(d.module.rank for d in deltas)
        self.nonzero = sum(int((d.module.E != 0).sum()) for d in deltas)
        self.losses.append(float(outputs["loss"]))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_pretrained_bert(tmp_path_factory.mktemp("bert"))


def adalora_callback(**kw):
    config = AdaLoraConfig(targets=["query", "value"], init_r=6, target_r=2, alpha=16, tinit=5, tfinal=10, deltaT=1,
                           **kw)
    return DeltaCallback(config, trainable=["classifier"])


def test_trainer_run_shrinks_the_budget_to_target_r(source, tmp_path):
    module = Classifier(source, lr=0.02)
    callback, record = adalora_callback(), Record()
    fit = trainer(tmp_path, [callback, record], max_steps=30, max_epochs=-1)
    fit.fit(module, loader())
    allocator = callback.allocators["adalora"]
    assert allocator.total_step == 30  # from the Trainer: estimated_stepping_batches
    initial, target = 4 * 6, 4 * 2
    kept = record.kept
    assert all(kept[s] == initial for s in range(1, 6))  # warm-up: tinit=5
    assert all(kept[s] >= kept[s + 1] for s in range(5, 20))  # the cubic schedule only shrinks
    assert initial > kept[10] > target
    assert all(kept[s] == target for s in range(20, 31))  # from total_step - tfinal = 20 on
    assert record.nonzero == target  # masked singular values stay zero in the final phase
    assert [h[0] for h in allocator.history] == list(range(6, 21))
    for step, budget, ranks in allocator.history:
        assert ranks <= budget
    first, last = sum(record.losses[:5]) / 5, sum(record.losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)  # AdaLoRA with the classifier head


def test_thirty_steps_of_adalora_alone_lower_the_loss(tmp_path):
    module = LanguageModel("gpt2", lr=0.05)  # causal LM on a fixed batch, nothing trained but the delta
    module.losses = []
    callback = DeltaCallback(AdaLoraConfig(init_r=6, target_r=2, alpha=16, tinit=5, tfinal=10))
    trainer(tmp_path, [callback], max_steps=30).fit(module)
    first, last = sum(module.losses[:5]) / 5, sum(module.losses[-5:]) / 5
    assert last < 0.97 * first, module.losses
    assert callback.allocators["adalora"].kept == 2 * 2  # c_attn of two blocks (the preset), target_r=2


def test_masked_ranks_survive_save_load_and_resume(source, tmp_path):
    module = Classifier(source, lr=0.02)
    fit = trainer(tmp_path, [adalora_callback(total_step=30)], max_steps=24, max_epochs=-1)
    fit.fit(module, loader())
    fit.save_checkpoint(tmp_path / "adalora.ckpt")
    masks = {d.path: d.module.rank_mask.clone() for d in DeltaModel(module.model).deltas()}
    assert sum(int(m.sum()) for m in masks.values()) == 8
    ckpt = torch.load(tmp_path / "adalora.ckpt", weights_only=True)
    assert all(f"model.{path}.rank_mask" in ckpt["state_dict"] for path in masks)
    ids = loader().dataset.tensors[0]
    module.eval()
    with torch.no_grad():
        expected = module(ids)

    reloaded = ReloadableClassifier.load_from_checkpoint(tmp_path / "adalora.ckpt").eval()
    for d in DeltaModel(reloaded.model).deltas():
        assert torch.equal(d.module.rank_mask, masks[d.path])
    with torch.no_grad():
        assert torch.equal(reloaded(ids), expected)

    save_delta(module.model, tmp_path / "delta")
    fresh = Classifier(source).eval()
    load_delta(fresh.model, tmp_path / "delta")
    with torch.no_grad():
        assert torch.equal(fresh(ids), expected)
    assert {d.path: d.module.rank for d in DeltaModel(fresh.model).deltas()} == {
        p: int(m.sum()) for p, m in masks.items()}

    # resume in the final phase: the masks and the allocator's state come back, the budget holds
    resumed, callback, record = Classifier(source, lr=0.02), adalora_callback(total_step=30), Record()
    resume = trainer(tmp_path, [callback, record], max_steps=30, max_epochs=-1)
    resume.fit(resumed, loader(), ckpt_path=str(tmp_path / "adalora.ckpt"))
    assert resume.global_step == 30
    assert callback.allocators["adalora"].history[-1][0] == 20
    assert all(k == 8 for k in record.kept.values()) and record.nonzero == 8
    for d in DeltaModel(resumed.model).deltas():
        assert torch.equal(d.module.rank_mask, masks[d.path])

    # a checkpoint whose callback state names the allocators "adalora" (before training hooks were generic)
    states = ckpt["callbacks"]
    (key,) = [k for k, v in states.items() if "hooks" in v]
    states[key] = {"adalora": states[key]["hooks"]}
    torch.save(ckpt, tmp_path / "older.ckpt")
    callback = adalora_callback(total_step=30)
    trainer(tmp_path, [callback], max_steps=30, max_epochs=-1).fit(
        Classifier(source, lr=0.02), loader(), ckpt_path=str(tmp_path / "older.ckpt"))
    assert callback.allocators["adalora"].history[-1][0] == 20


def test_gradient_accumulation_allocates_once_per_optimizer_step(source, tmp_path):
    module = Classifier(source, lr=0.02)
    callback = DeltaCallback(AdaLoraConfig(targets=["query", "value"], init_r=4, target_r=1, tinit=1, tfinal=3),
                             trainable=["classifier"])
    fit = trainer(tmp_path, [callback], max_steps=12, max_epochs=-1, accumulate_grad_batches=2)
    fit.fit(module, loader())
    allocator = callback.allocators["adalora"]
    assert allocator.total_step == 12 and fit.global_step == 12
    assert [h[0] for h in allocator.history] == list(range(2, 10))  # after tinit, up to total_step - tfinal
    assert allocator.kept == 4


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_peft_loads_the_export_with_its_rank_pattern(tmp_path, family):
    make, targets, _ = FAMILY[family]
    base = make().eval()
    model = copy.deepcopy(base)
    handle = attach(model, "adalora", targets=targets, init_r=4, target_r=2, alpha=8, total_step=10)
    randomize(handle, size=0.3)
    kept = [[True, False, True, True], [False] * 4, [True] * 4, [False, True, False, False]]
    for d, mask in zip(handle.deltas(), kept, strict=True):
        d.module.rank_mask.copy_(torch.tensor(mask))
        d.module.apply_mask()
    inputs = family_inputs(family)
    ours = model(**inputs).logits
    export_peft(model, tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    ranks = {n.rsplit(".lora_E", 1)[0]: p.shape[0] for n, p in loaded.named_parameters() if ".lora_E" in n}
    assert sorted(ranks.values()) == sorted(sum(m) for m in kept)  # resized to the kept ranks, 0 included
    torch.testing.assert_close(loaded(**inputs).logits, ours, rtol=0, atol=1e-5)
