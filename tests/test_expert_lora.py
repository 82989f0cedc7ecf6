"""LoRA on fused 3-D expert parameters (Qwen3-MoE, Mixtral, gpt-oss): values, PEFT both ways, memory, training."""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as pl
import peft
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForCausalLM

from lightning_delta import DeltaCallback, DeltaModel, LoraConfig, UnsupportedModuleError, attach, trainable_parameters
from lightning_delta.peft_format import export_peft, import_peft
from lightning_helpers import script_report, trainer
from models import tiny_moe

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
FAMILIES = ["qwen3_moe", "mixtral", "gpt_oss"]


def ids(batch: int = 2, seq: int = 7) -> torch.Tensor:
    return torch.randint(1, 99, (batch, seq), generator=torch.Generator().manual_seed(3))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids()).logits


def randomize(handle, seed: int = 1, scale: float = 0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.delta_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return handle


def dense_reference(base, model):
    """``base`` with each expert's weight replaced by ``W[e] + s * B[e] @ A[e]``, written out per expert."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for d in DeltaModel(model).deltas():
            experts = ref.get_submodule(d.target_path)
            for name in d.module.parameter_names:
                weight = getattr(experts, name)
                for e in range(weight.shape[0]):
                    update = d.module.scale * d.module.B[name][e] @ d.module.A[name][e]  # (out, in)
                    weight[e] += update.T if getattr(experts, "is_transposed", False) else update
    return ref


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_init_each_expert_reads_its_own_update_and_merge_is_exact(family):
    torch.manual_seed(0)
    base = tiny_moe(family).eval()
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    handle = attach(model, LoraConfig(r=2, targets=EXPERTS))
    assert len(handle.deltas()) == 2  # one per layer's experts module, both parameters in it
    # identity (up to float order: an attached experts module runs its eager per-expert path)
    torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=1e-6)
    randomize(handle)
    tuned = logits(model)
    assert (tuned - logits(base)).abs().max() > 1e-2
    torch.testing.assert_close(tuned, logits(dense_reference(base, model)), rtol=1e-5, atol=1e-5)
    handle.merge()
    torch.testing.assert_close(logits(model), tuned, rtol=1e-5, atol=1e-5)
    handle.unmerge()
    handle.detach()
    assert type(model.model.layers[0].mlp.experts) is type(base.model.layers[0].mlp.experts)
    for key, value in model.state_dict().items():  # same keys, the weights back to theirs
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model), logits(base), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("order", [EXPERTS, EXPERTS[::-1]])
def test_same_outputs_as_peft_target_parameters_both_ways(family, order, tmp_path):
    torch.manual_seed(0)
    base = tiny_moe(family).eval()
    # ours -> PEFT
    ours = copy.deepcopy(base)
    randomize(attach(ours, LoraConfig(r=2, alpha=4.0, targets=[*order, "q_proj"])))
    export_peft(ours, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded), logits(ours), rtol=1e-5, atol=1e-5)
    # PEFT -> ours
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, lora_alpha=8, target_modules=["v_proj"], target_parameters=[f"mlp.{p}" for p in order])).eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    theirs.save_pretrained(tmp_path / "theirs")
    imported = copy.deepcopy(base)
    handle = import_peft(imported, tmp_path / "theirs")
    assert {d.target_path.rsplit(".", 1)[-1] for d in handle.deltas()} == {"experts", "v_proj"}
    torch.testing.assert_close(logits(imported), logits(theirs), rtol=1e-5, atol=1e-5)


def test_all_linear_says_what_it_left_out_and_the_router_stays_frozen():
    model = tiny_moe("qwen3_moe")
    with pytest.warns(UserWarning, match=r"leaves out 4 fused expert parameters .*experts.down_proj,"
                                         r" experts.gate_up_proj.*targets=\['all-linear'"):
        handle = attach(model, LoraConfig(r=2, targets="all-linear"))
    assert not any(d.target_path.endswith(("experts", "gate")) for d in handle.deltas())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle = attach(model, LoraConfig(r=2, targets=["all-linear", *EXPERTS], name="both")).freeze_backbone()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.layers.0.mlp.experts.both.A.gate_up_proj" in trained
    assert not any(".mlp.gate." in n or n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in trained)
    model(input_ids=ids(), labels=ids()).loss.backward()
    assert model.model.layers[0].mlp.experts.gate_up_proj.grad is None
    assert model.model.layers[0].mlp.gate.weight.grad is None
    assert model.model.layers[0].mlp.experts.both.B["down_proj"].grad.abs().sum() > 0  # (A waits for B = 0)


def test_what_expert_parameters_do_not_support_is_refused_by_name():
    model = tiny_moe("qwen3_moe")
    cases = [
        (LoraConfig(targets=EXPERTS, init="pissa"),
         r"lora init='pissa' on fused expert parameters \(model.layers.0.mlp.experts: gate_up_proj, down_proj\)"),
        (LoraConfig(targets="mlp.experts"), r"cannot attach to 'model.layers.0.mlp.experts'.*'mlp.experts.gate_up"),
    ]
    for config, message in cases:
        with pytest.raises(UnsupportedModuleError, match=message):
            attach(model, config)
        assert not DeltaModel(model).deltas()


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation allocates (views of its inputs, such as ``W[e]``, are not new)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


def largest_in_a_step(model) -> int:
    with LargestTensor() as probe:
        model(input_ids=ids(2, 4), labels=ids(2, 4)).loss.backward()
    return probe.largest


def test_a_training_step_never_forms_a_dense_expert_update():
    """8 experts x 256 x 512: the fused weight is the largest tensor by far; forming ``W + s B A`` (PEFT's fold)
    or ``s B A`` would produce one of its size."""
    torch.manual_seed(0)
    base = tiny_moe("qwen3_moe", experts=8, hidden=256, expert_size=256)
    fused = base.model.layers[0].mlp.experts.gate_up_proj.numel()  # 8 x 512 x 256
    ours = copy.deepcopy(base)
    attach(ours, LoraConfig(r=4, targets=EXPERTS)).freeze_backbone()
    assert largest_in_a_step(ours) < fused / 4  # activations and gradients, not an expert stack
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, target_modules=[], target_parameters=[f"mlp.{p}" for p in EXPERTS]))
    assert largest_in_a_step(theirs) >= fused  # the probe sees a dense fold where there is one


class MoeLM(pl.LightningModule):
    def __init__(self, source: str) -> None:
        super().__init__()
        self.model = AutoModelForCausalLM.from_pretrained(source)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(trainable_parameters(self), lr=1e-2)


def fit(source, root, epochs, resume=None):
    module = MoeLM(source)
    callback = DeltaCallback(LoraConfig(r=2, targets=[*EXPERTS, "q_proj"]))
    run = trainer(root, [callback], max_epochs=epochs)
    run.fit(module, DataLoader(TensorDataset(ids(8, 6)), batch_size=4), ckpt_path=resume, weights_only=True)
    return module, run


def test_callback_trains_the_experts_checkpoints_only_deltas_and_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    tiny_moe("qwen3_moe").save_pretrained(tmp_path / "moe")
    source = str(tmp_path / "moe")
    straight, _ = fit(source, tmp_path / "a", 2)
    half, run = fit(source, tmp_path / "b", 1)
    run.save_checkpoint(tmp_path / "half.ckpt")
    resumed, run = fit(source, tmp_path / "c", 2, resume=tmp_path / "half.ckpt")
    assert run.global_step == 4
    saved = torch.load(tmp_path / "half.ckpt", weights_only=True)["state_dict"]
    expert_keys = {k for k in saved if ".experts." in k}
    assert expert_keys == {f"model.model.layers.{i}.mlp.experts.lora.{f}.{p}" for i in range(2) for f in "AB"
                           for p in ("gate_up_proj", "down_proj")}
    assert all(".lora." in k for k in saved)  # no backbone weight, no router
    want, got = DeltaModel(straight.model).delta_state_dict(), DeltaModel(resumed.model).delta_state_dict()
    assert set(want) == set(got) and any(".experts." in k for k in want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
    moved = DeltaModel(half.model).delta_state_dict()
    assert not torch.equal(moved["model.layers.0.mlp.experts.lora.B.gate_up_proj"],
                           want["model.layers.0.mlp.experts.lora.B.gate_up_proj"])
    assert moved["model.layers.0.mlp.experts.lora.B.down_proj"].abs().sum() > 0  # the experts trained


def test_fsdp2_on_two_processes_shards_the_expert_deltas_and_matches_one_process(tmp_path):
    torch.manual_seed(0)
    tiny_moe("qwen3_moe").save_pretrained(tmp_path / "moe")
    targets = "experts.gate_up_proj,experts.down_proj,q_proj"
    two = script_report("fsdp2_train.py", tmp_path / "two", tmp_path / "moe", 2, 2, "--targets", targets)
    one = script_report("fsdp2_train.py", tmp_path / "one", tmp_path / "moe", 1, 2, "--targets", targets)
    assert two["sharded"] and two["steps"] == one["steps"] == 4 and two["frozen_with_grad"] == 0
    assert two["optimizer_states"] == two["trainable"] == 2 * (4 + 2)  # per layer: experts' 2 A + 2 B, q's A, B
    experts = [k for k in two["state"] if ".experts." in k]
    assert len(experts) == 8 and all(two["state"][k].shape[0] == 4 for k in experts)  # whole: both ranks' shards
    for key, value in one["state"].items():
        torch.testing.assert_close(two["state"][key], value, rtol=1e-5, atol=1e-6)
    assert all(two["state"][k].abs().sum() > 0 for k in experts if ".B." in k)
