"""SIGKILL at random points of a save never destroys the previous good version: after every kill the
folder / file loads, and holds exactly one of the versions that were being written."""

from __future__ import annotations

import contextlib
import multiprocessing
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch
from models import tiny_bert

from lightning_delta import DeltaCallback, DeltaModel, attach, load_delta, save_delta
from lightning_delta.checkpoint_io import AtomicCheckpointIO
from lightning_delta.files import read_checkpoint

KILLS = 20


def kill_loop(work, check, kills: int = KILLS, longest: float = 0.15, seed: int = 0) -> int:
    """Runs ``work`` (an endless save loop) in a forked process and SIGKILLs it after a random delay,
    ``kills`` times; ``check()`` runs after each kill. Returns how many kills landed while it ran."""
    context = multiprocessing.get_context("fork")
    rng = random.Random(seed)
    landed = 0
    for _ in range(kills):
        started = context.Event()
        process = context.Process(target=work, args=(started,), daemon=True)
        process.start()
        assert started.wait(30), "the save loop did not start"
        time.sleep(rng.uniform(0, longest))
        landed += process.is_alive()
        process.kill()
        process.join()
        check()
    return landed


def lora_versions():
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = tiny_bert().eval()
        handle = attach(model, "lora", r=2).freeze_backbone(trainable="classifier")
        with torch.no_grad():
            for p in handle.delta_parameters():
                p.normal_()
        models.append(model)
    return models


def test_sigkill_during_save_delta_leaves_a_loadable_folder_every_time(tmp_path):
    versions = lora_versions()
    states = [DeltaModel(m).delta_state_dict() for m in versions]
    folder = tmp_path / "delta"
    save_delta(versions[0], folder)

    def work(started):
        torch.set_num_threads(1)
        i = 1
        while True:
            save_delta(versions[i % 2], folder)
            started.set()
            i += 1

    def check():
        loaded = DeltaModel(load_delta(tiny_bert().eval(), folder)).delta_state_dict()
        assert any(loaded.keys() == s.keys() and all(torch.equal(loaded[k], s[k]) for k in s) for s in states)

    assert kill_loop(work, check) == KILLS


@contextlib.contextmanager
def second_filesystem(size_mb: int = 256):
    """A tmpfs mounted for the test (root only): a checkpoint folder on another filesystem than $TMPDIR."""
    mount = Path(tempfile.mkdtemp(prefix="ld-tmpfs-"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        shutil.rmtree(mount, ignore_errors=True)
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
        shutil.rmtree(mount, ignore_errors=True)


def test_sigkill_during_a_callback_checkpoint_on_another_filesystem_keeps_the_previous_file(tmp_path):
    """The checkpoint IO a DeltaCallback run writes with, checkpoint on a tmpfs, $TMPDIR on the disk:
    Lightning's default moved a temporary file across filesystems, a copy a kill could tear."""
    import lightning.pytorch as pl
    from lightning_helpers import Classifier, save_pretrained_bert

    trainer = pl.Trainer(logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    module = Classifier(save_pretrained_bert(tmp_path / "bert"))
    DeltaCallback("lora", r=2).setup(trainer, module, "fit")
    io = trainer.strategy.checkpoint_io
    assert isinstance(io, AtomicCheckpointIO)
    versions = [{"state_dict": {"w": torch.full((6_000_000,), float(v))}, "version": v} for v in (0, 1)]
    with second_filesystem() as mount:
        path = mount / "last.ckpt"
        io.save_checkpoint(versions[0], path)

        def work(started):
            torch.set_num_threads(1)
            started.set()
            i = 1
            while True:
                io.save_checkpoint(versions[i % 2], path)
                i += 1

        def check():
            loaded = read_checkpoint(path)
            v = loaded["version"]
            assert torch.equal(loaded["state_dict"]["w"], versions[v]["state_dict"]["w"])

        assert kill_loop(work, check, longest=0.4) == KILLS
        assert not [p for p in mount.iterdir() if p.name != "last.ckpt" and not p.name.endswith(".tmp")]
