"""DDP with 2 CPU processes (gloo): only delta gradients travel, ranks agree, one checkpoint."""


import pytest
import torch

from lightning_delta import DeltaCallback, DeltaModel
from lightning_helpers import Classifier, launch_script, loader, save_pretrained_bert, trainer

@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    done = launch_script("ddp_train.py", out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stderr


def test_only_trainable_gradients_are_communicated(ddp_run):
    out, _ = ddp_run
    for rank in (0, 1):
        report = torch.load(out / f"rank{rank}.pt", weights_only=True)
        assert report["steps"] == 4  # 16 examples / 2 ranks / batch 4 = 2 steps an epoch, two epochs
        # DDP all-reduces each trainable gradient once per step, and nothing else
        assert report["bytes"] == report["steps"] * report["trainable_bytes"]
        assert report["trainable_bytes"] < 0.1 * report["total_bytes"]


def test_ranks_hold_identical_trained_deltas_and_one_checkpoint(ddp_run):
    out, _ = ddp_run
    a, b = (torch.load(out / f"rank{r}.pt", weights_only=True)["state"] for r in (0, 1))
    assert a.keys() == b.keys() and any(k.endswith("lora.B") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert all(a[k].abs().sum() > 0 for k in a if k.endswith("lora.B"))
    assert len(list((out / "ckpt").glob("*.ckpt"))) == 1


def test_ddp_spawn_warns_that_the_main_process_lacks_the_deltas(tmp_path, capfd):
    source = save_pretrained_bert(tmp_path / "bert")
    module = Classifier(source)
    trainer(tmp_path, [DeltaCallback("lora", r=4)], strategy="ddp_spawn", devices=2, max_steps=1).fit(module, loader())
    assert "ddp_spawn" in capfd.readouterr().err
    assert not DeltaModel(module.model).deltas()  # the warning is about this
