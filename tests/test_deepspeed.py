"""DeepSpeed ZeRO-2/3 on the CPU (gloo) with 2 processes: delta-only single-file checkpoints with the
real values, no gathering of the frozen backbone, resume on 2 and on 1 processes."""

import os

import pytest
import torch

from lightning_delta import load_delta
from lightning_delta.checkpoint import META_KEY
from lightning_helpers import launch_script, script_report
from models import tiny_llama

pytest.importorskip("deepspeed")

CPU = {"DS_ACCELERATOR": "cpu"}


def run(out, source, devices, epochs, stage, *extra):
    return script_report("deepspeed_train.py", out, source, devices, epochs, stage, *extra, env=CPU)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed")
    torch.manual_seed(0)
    tiny_llama().save_pretrained(root / "llama")
    source = str(root / "llama")
    reports = {"zero3": run(root / "zero3", source, 2, 2, 3),
               "half": run(root / "half", source, 2, 1, 3),
               "zero2": run(root / "zero2", source, 2, 2, 2),
               "bf16": run(root / "bf16", source, 2, 2, 3, "--precision", "bf16-mixed")}
    reports["resumed_2"] = run(root / "resumed_2", source, 2, 2, 3, "--resume", str(root / "half" / "final.ckpt"))
    reports["resumed_1"] = run(root / "resumed_1", source, 1, 2, 3, "--resume", str(root / "half" / "final.ckpt"))
    return root, reports


def test_zero3_partitions_the_frozen_backbone_and_trains_only_deltas(runs):
    _, reports = runs
    zero3 = reports["zero3"]
    assert zero3["optimizer"] == "DeepSpeedZeroOptimizer_Stage3" and zero3["steps"] == 4
    assert zero3["partitioned"] == 21 and zero3["frozen_with_grad"] == 0  # every frozen tensor is a placeholder
    assert reports["zero2"]["optimizer"] == "DeepSpeedZeroOptimizer" and reports["zero2"]["partitioned"] == 0
    assert len(zero3["state"]) == 8 and all(v.abs().sum() > 0 for k, v in zero3["state"].items() if k.endswith("B"))


@pytest.mark.parametrize("name", ["zero3", "zero2", "bf16"])
def test_checkpoint_holds_the_real_delta_values_and_nothing_else(runs, name):
    root, reports = runs
    ckpt = torch.load(root / name / "final.ckpt", weights_only=True)
    live = reports[name]["state"]  # gathered from the model after fit, not through the strategy
    assert set(ckpt["state_dict"]) == set(live)
    for key, value in live.items():
        assert ckpt["state_dict"][key].shape == value.shape  # full tensors, never ZeRO-3's empty placeholders
        torch.testing.assert_close(ckpt["state_dict"][key], value, rtol=0, atol=0)
    moments = ckpt["optimizer_states"][0]["deepspeed"]["state"]
    assert set(moments) == set(live) and all(set(m) == {"exp_avg", "exp_avg_sq"} for m in moments.values())
    assert META_KEY in ckpt and os.path.getsize(root / name / "final.ckpt") < 100_000


@pytest.mark.parametrize("name", ["zero3", "zero2", "bf16"])
def test_saving_moves_only_delta_values_and_their_optimizer_state(runs, name):
    _, reports = runs
    report = reports[name]
    delta_bytes = sum(v.numel() * 4 for v in report["state"].values())
    # each trained tensor and its two Adam moments assembled once; the 108 KB frozen backbone never
    assert report["save_comm_bytes"] == 3 * delta_bytes
    assert report["frozen_bytes"] > 8 * report["save_comm_bytes"]


@pytest.mark.parametrize("resumed", ["resumed_2", "resumed_1"])
def test_resume_on_same_and_smaller_world_size_matches_the_uninterrupted_run(runs, resumed):
    _, reports = runs
    want, got = reports["zero3"]["state"], reports[resumed]["state"]
    assert reports[resumed]["steps"] == 4
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


def test_zero2_and_zero3_train_the_same_deltas(runs):
    _, reports = runs
    for key, value in reports["zero3"]["state"].items():
        torch.testing.assert_close(reports["zero2"]["state"][key], value, rtol=1e-5, atol=1e-6)


def test_the_checkpoint_loads_onto_a_plain_backbone(runs):
    root, reports = runs
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(root / "llama")
    load_delta(model, root / "zero3" / "final.ckpt")
    state = {f"model.{k}": v for k, v in model.state_dict().items() if ".lora." in k}
    assert set(state) == set(reports["zero3"]["state"])
    for key, value in reports["zero3"]["state"].items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)


def test_a_sharded_directory_checkpoint_is_refused_with_the_fix(tmp_path):
    from lightning_delta import DeltaDeepSpeedStrategy, DeltaModelParallelStrategy

    with pytest.raises(ValueError, match="directory .*DeepSpeed's sharded format.* Lightning's DeepSpeedStrategy"):
        DeltaDeepSpeedStrategy(stage=3).load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="directory .*distributed checkpoint.* Lightning's ModelParallelStrategy"):
        DeltaModelParallelStrategy().load_checkpoint(tmp_path)


def test_bf16_keeps_a_bf16_backbone_and_fp32_deltas_close_to_the_fp32_run(runs):
    _, reports = runs
    bf16, fp32 = reports["bf16"], reports["zero3"]
    assert bf16["dtypes"] == {"frozen": ["torch.bfloat16"], "trained": ["torch.float32"]}
    assert fp32["dtypes"] == {"frozen": ["torch.float32"], "trained": ["torch.float32"]}
    for key, value in fp32["state"].items():  # 4 Adam steps at lr 1e-2 through bf16 activations
        assert ((bf16["state"][key] - value).norm() / value.norm()).item() < 0.15


def test_a_backbone_built_under_zero_init_is_refused_with_the_fix(runs):
    root, _ = runs
    done = launch_script("deepspeed_train.py", root / "zero_init", root / "llama", 2, 1, 3, "--configure-model",
                         env=CPU)
    assert done.returncode != 0
    assert "is a DeepSpeed ZeRO-3 partition (full shape (32, 32))" in done.stderr
    assert "in the LightningModule's __init__, not in configure_model" in done.stderr
