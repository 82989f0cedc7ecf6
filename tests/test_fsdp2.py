"""FSDP2 on CPU with 2 processes: attach before sharding, delta-only checkpoints, resume on 2 and 1 processes."""

import os

import pytest
import torch

from lightning_delta.checkpoint import META_KEY
from lightning_helpers import script_report
from models import tiny_llama


def run(out, source, devices, epochs, *extra):
    return script_report("fsdp2_train.py", out, source, devices, epochs, *extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2")
    torch.manual_seed(0)
    tiny_llama().save_pretrained(root / "llama")
    source = str(root / "llama")
    full = run(root / "full", source, 2, 2)
    half = run(root / "half", source, 2, 1, "--explicit-shard")
    resumed_2 = run(root / "resume2", source, 2, 2, "--resume", str(root / "half" / "final.ckpt"))
    resumed_1 = run(root / "resume1", source, 1, 2, "--resume", str(root / "half" / "final.ckpt"))
    checkpointed = run(root / "checkpointed", source, 2, 2, "--checkpointing")
    return root, {"full": full, "half": half, "resumed_2": resumed_2, "resumed_1": resumed_1,
                  "checkpointed": checkpointed}


def test_sharded_training_keeps_frozen_parameters_out_of_grads_and_optimizer(runs):
    _, reports = runs
    full = reports["full"]
    assert full["sharded"] and full["steps"] == 4
    assert full["frozen_with_grad"] == 0
    assert full["optimizer_states"] == full["trainable"] == 8  # A and B of q and v in 2 layers
    assert all(v.abs().sum() > 0 for k, v in full["state"].items() if k.endswith("lora.B"))


def test_checkpoint_holds_every_shard_of_every_delta_tensor_and_nothing_else(runs):
    root, reports = runs
    ckpt = torch.load(root / "full" / "final.ckpt", weights_only=True)
    state = ckpt["state_dict"]
    assert set(state) == {f"model.{k}" for k in reports["full"]["state"]}
    for key, value in reports["full"]["state"].items():
        assert torch.equal(state[f"model.{key}"], value)  # full tensors (both ranks' shards)
    assert META_KEY in ckpt and len(ckpt["optimizer_states"][0]["state"]) == 8
    assert os.path.getsize(root / "full" / "final.ckpt") < 200_000


@pytest.mark.parametrize("resumed", ["resumed_2", "resumed_1", "checkpointed"])
def test_resume_on_same_and_smaller_world_size_and_checkpointing_match_the_plain_run(runs, resumed):
    _, reports = runs
    want, got = reports["full"]["state"], reports[resumed]["state"]
    assert reports[resumed]["steps"] == 4
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)
