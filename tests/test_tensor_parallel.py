"""Tensor parallelism with LoRA: 2 CPU processes (gloo) under DeltaModelParallelStrategy(data_parallel_size=1,
tensor_parallel_size=2) against one process with the same LoRA tensors; unsupported combinations on a 1-rank mesh."""

import os
from pathlib import Path

import pytest
import torch

from lightning_delta import attach
from lightning_delta.checkpoint import META_KEY
from lightning_delta.errors import DeltaConfigError
from lightning_helpers import script_report
from models import tiny_llama

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COLWISE, ROWWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"), ("o_proj", "down_proj")


def batches() -> torch.Tensor:  # as tests/scripts/tp_train.py
    return torch.randint(1, 99, (12, 8), generator=torch.Generator().manual_seed(0))


def run(out, source, state, *extra):
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # this checkout's package
    return script_report("tp_train.py", out, source, state, *extra, env={"PYTHONPATH": path})


def single_process(source, state):
    """The model in one process with the same LoRA tensors."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source)
    handle = attach(model, "lora", r=4, targets=TARGETS).freeze_backbone()
    handle.load_delta_state_dict(state)
    return model, handle


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    torch.manual_seed(0)
    model = tiny_llama()
    model.save_pretrained(root / "llama")
    handle = attach(model, "lora", r=4, targets=TARGETS).freeze_backbone()
    generator = torch.Generator().manual_seed(5)  # B non-zero, so the update shows in the outputs
    state = {k: torch.randn(v.shape, generator=generator) * 0.1 for k, v in handle.delta_state_dict().items()}
    torch.save(state, root / "state.pt")
    source = str(root / "llama")
    reports = {"tensor_parallel": run(root / "tp", source, root / "state.pt"),
               "late_attach": run(root / "late", source, root / "state.pt", "--late-attach"),
               "two_epochs": run(root / "two", source, root / "state.pt", "--epochs", "2")}
    reports["resumed"] = run(root / "resumed", source, root / "state.pt", "--epochs", "2",
                             "--resume", str(root / "tp" / "final.ckpt"))
    return root, source, state, reports


MODES = ["tensor_parallel", "late_attach"]


@pytest.mark.parametrize("mode", MODES)
def test_lora_factors_are_sharded_like_their_targets(runs, mode):
    _, _, state, reports = runs
    report = reports[mode]
    assert report["world_size"] == 2
    placements = report["placements"]
    assert len(placements) == len(state) == 28
    for name, (kind, placement) in placements.items():
        assert kind == "DTensor"
        colwise = name.split(".")[-3] in COLWISE
        assert name.split(".")[-3] in COLWISE + ROWWISE
        if name.endswith("A"):
            assert placement == ("(Replicate(),)" if colwise else "(Shard(dim=1),)"), name
        else:
            assert placement == ("(Shard(dim=0),)" if colwise else "(Replicate(),)"), name
    assert report["frozen_dtensors"] == 14  # the 7 parallelized weights of each of 2 layers
    assert report["frozen_with_grad"] == 0
    assert report["optimizer_states"] == 28


@pytest.mark.parametrize("mode", MODES)
def test_outputs_and_gradients_equal_one_process(runs, mode):
    _, source, state, reports = runs
    report = reports[mode]
    model, _ = single_process(source, state)
    ids = batches()[:4]
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    torch.testing.assert_close(report["logits"], out.logits.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(report["loss"], out.loss.detach(), rtol=0, atol=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(report["grads"]) == set(grads)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(report["grads"][name], grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_training_steps_equal_one_process(runs, mode):
    _, source, state, reports = runs
    report = reports[mode]
    model, handle = single_process(source, state)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for ids in batches().split(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    assert report["steps"] == 3
    torch.testing.assert_close(torch.stack(report["losses"]), torch.stack(losses), rtol=0, atol=1e-5)
    want = handle.delta_state_dict()
    assert set(report["state"]) == set(want)
    for key, value in want.items():
        assert not torch.allclose(value, state[key])  # the steps moved every tensor
        torch.testing.assert_close(report["state"][key], value, rtol=0, atol=1e-5)


def test_checkpoint_holds_full_lora_tensors_that_load_into_one_process(runs):
    root, source, state, reports = runs
    report = reports["tensor_parallel"]
    ckpt = torch.load(root / "tp" / "final.ckpt", weights_only=True)
    assert META_KEY in ckpt and len(ckpt["optimizer_states"][0]["state"]) == 28
    loaded = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    assert set(loaded) == set(state)  # LoRA tensors only, no backbone
    for key, value in loaded.items():
        assert value.shape == state[key].shape  # full, gathered from both ranks
        assert torch.equal(value, report["state"][key])
    model, handle = single_process(source, state)
    handle.load_delta_state_dict(loaded)
    with torch.no_grad():
        logits = model(input_ids=batches()[:4]).logits
    torch.testing.assert_close(logits, report["final_logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_merge_unmerge_and_mixed_batches_under_tensor_parallelism(runs, mode):
    _, source, _, reports = runs
    report = reports[mode]
    model, handle = single_process(source, report["state"])
    ids = batches()[:4]
    with torch.no_grad():
        with handle.mixed_batch(["lora", None, "lora", None]):
            mixed = model(input_ids=ids).logits
        handle.set_active([])
        plain = model(input_ids=ids).logits
    assert (mixed[1] - report["final_logits"][1]).abs().max() > 1e-3  # the trained LoRA changes the outputs
    for key in ("merged", "unmerged"):
        torch.testing.assert_close(report[key], report["final_logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(report["mixed"], mixed, rtol=0, atol=1e-5)
    torch.testing.assert_close(report["mixed"][1::2], plain[1::2], rtol=0, atol=1e-5)


def test_resuming_from_the_delta_checkpoint_continues_like_an_uninterrupted_run(runs):
    _, _, _, reports = runs
    want, got = reports["two_epochs"], reports["resumed"]
    assert want["steps"] == got["steps"] == 6
    for key, value in want["state"].items():
        torch.testing.assert_close(got["state"][key], value, rtol=0, atol=1e-6)


# -- unsupported combinations, on a 1-rank mesh in this process -----------------------------------------
@pytest.fixture
def mesh(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group exists already")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def layer_plan(**styles):
    return {f"model.layers.*.{k}": v for k, v in styles.items()}


def test_attach_then_plan_and_plan_then_attach_give_the_same_layout(mesh):
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from lightning_delta.distributed import distribute_deltas, tensor_parallel

    plan = layer_plan(**{"self_attn.q_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel()})
    early = tiny_llama()
    attach(early, "lora", r=4, targets=["q_proj", "o_proj"]).freeze_backbone()
    tensor_parallel(early, mesh, plan)
    late = tiny_llama()
    parallelize_module(late, mesh, plan)
    attach(late, "lora", r=4, targets=["q_proj", "o_proj"]).freeze_backbone()
    distribute_deltas(late)
    for model in (early, late):
        attn = model.model.layers[0].self_attn
        assert attn.q_proj.lora.B.placements[0].is_shard(0) and attn.o_proj.lora.A.placements[0].is_shard(1)
        assert all(isinstance(p, DTensor) for p in model.parameters() if p.requires_grad)
        # the delta's hook runs first, on the DTensor output, before the plan's output hook
        assert next(iter(attn.q_proj._forward_hooks.values())).__self__ is attn.q_proj.lora
        ids = batches()[:2]
        model(input_ids=ids, labels=ids).loss.backward()
    distribute_deltas(early)  # idempotent


def test_unsupported_delta_or_style_on_a_parallelized_target_names_module_and_fix(mesh):
    from torch.distributed.tensor import distribute_module
    from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, SequenceParallel

    class ReplicateAll(ParallelStyle):  # a custom style on a parent: every tensor below it replicated
        def _apply(self, module, device_mesh):
            return distribute_module(module, device_mesh)

    from lightning_delta.distributed import shard, tensor_parallel

    cases = [
        (dict(method="ia3", targets=["v_proj"]), layer_plan(**{"self_attn.v_proj": ColwiseParallel()}),
         "'ia3' cannot run on the ColwiseParallel target 'model.layers.0.self_attn.v_proj'"),
        (dict(method="lora", r=2, targets=["q_proj"], dropout=0.1),
         layer_plan(**{"self_attn.q_proj": ColwiseParallel()}), "dropout=0.1"),
        (dict(method="lora", r=2, targets=["q_proj"]), layer_plan(**{"self_attn.q_proj": SequenceParallel()}),
         "supported are nn.Linear targets with ColwiseParallel() or RowwiseParallel()"),
        (dict(method="lora", r=2, targets=["q_proj"]), layer_plan(self_attn=ReplicateAll()),
         "its target sits inside 'model.layers.0.self_attn'"),
        (dict(method="lora", r=2, targets=["embed_tokens"]), {"model.embed_tokens": RowwiseParallel()},
         "'model.embed_tokens' (Embedding"),
    ]
    for hparams, plan, message in cases:
        model = tiny_llama()
        attach(model, **hparams).freeze_backbone()
        with pytest.raises(DeltaConfigError, match="exclude=") as err:
            tensor_parallel(model, mesh, plan)
        assert message in str(err.value)
    model = tiny_llama()
    attach(model, "lora", r=2, targets=["q_proj"])
    tensor_parallel(model, mesh, layer_plan(**{"self_attn.q_proj": ColwiseParallel()}))
    with pytest.raises(DeltaConfigError, match="not supported"):
        shard(model, mesh)


def test_ready_task_without_a_plan_refuses_tensor_parallel_size_above_one(tmp_path):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_delta.tasks import CausalLanguageModeling

    tiny_llama().save_pretrained(tmp_path / "llama")
    task = CausalLanguageModeling(str(tmp_path / "llama"))
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    strategy._device_mesh = {"tensor_parallel": SimpleNamespace(size=lambda: 2), "data_parallel": None}
    task._trainer = SimpleNamespace(strategy=strategy)
    with pytest.raises(DeltaConfigError, match="override configure_model and call lightning_delta.distributed"):
        task.configure_model()
