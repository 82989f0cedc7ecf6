"""Faults: a SIGKILLed run resumes to the same deltas; a torn checkpoint never loads as valid."""

import signal

import pytest
import torch

from lightning_delta import CheckpointReadError, load_delta
from lightning_helpers import Classifier, launch_script, save_pretrained_bert

def run(out, source, *extra):
    return launch_script("kill_resume.py", out, source, *extra)


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    source = save_pretrained_bert(root / "bert")
    straight = run(root / "straight", source)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = run(root / "killed", source, "--kill-at-step", "8")  # 3 steps an epoch: mid-epoch 3
    resumed = run(root / "killed", source, "--resume", str(root / "killed" / "ckpt" / "last.ckpt"))
    return root, killed, resumed


def test_sigkill_mid_run_then_resume_from_last_matches_an_uninterrupted_run(killed_and_resumed):
    root, killed, resumed = killed_and_resumed
    assert killed.returncode == -signal.SIGKILL  # died at step 8, mid-epoch 3, after saving epoch 2
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want = torch.load(root / "straight" / "final.pt", weights_only=True)
    got = torch.load(root / "killed" / "final.pt", weights_only=True)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)


def test_every_torn_prefix_of_a_checkpoint_is_refused(killed_and_resumed, tmp_path):
    root, _, _ = killed_and_resumed
    data = (root / "killed" / "ckpt" / "last.ckpt").read_bytes()
    source = str(root / "bert")
    torn = tmp_path / "torn.ckpt"
    for cut in sorted({1, 2, 100, len(data) // 3, len(data) // 2, len(data) - 1000, len(data) - 22, len(data) - 1}):
        torn.write_bytes(data[:cut])
        with pytest.raises(CheckpointReadError, match="truncated or corrupt"):
            load_delta(Classifier(source), torn)
    torn.write_bytes(data)
    load_delta(Classifier(source), torn)  # the whole file loads


def test_an_interrupted_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    """Under DeltaCallback, checkpoints are written to a temporary file beside the target, renamed on success."""
    import io

    from lightning_delta import DeltaCallback
    from lightning_delta.checkpoint_io import AtomicCheckpointIO
    from lightning_helpers import loader, trainer

    module = Classifier(save_pretrained_bert(tmp_path / "bert"))
    t = trainer(tmp_path, [DeltaCallback("lora", r=4)], max_steps=2)
    t.fit(module, loader())
    assert isinstance(t.strategy.checkpoint_io, AtomicCheckpointIO)
    path = tmp_path / "last.ckpt"
    t.save_checkpoint(path)
    before = path.read_bytes()
    with torch.no_grad():
        module.model.bert.encoder.layer[0].attention.self.query.lora.B.add_(1.0)

    real_save = torch.save

    def torn_save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: buffer.tell() // 2])
        raise OSError("disk vanished mid-write")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="mid-write"):
        t.save_checkpoint(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".ckpt", ".tmp")) == ["last.ckpt"]
    load_delta(Classifier(str(tmp_path / "bert")), path)
