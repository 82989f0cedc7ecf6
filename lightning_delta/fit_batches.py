"""A look at the first training batches before training starts, leaving the run as if it had not looked.

Data-driven initialisations (LoRA ``init="eva"``) run the model on a few batches of the Trainer's
train dataloader at fit start. The batches come from a fresh iterator of that dataloader (the
loop's own is untouched), and every random generator a dataloader or a ``training_step`` may
draw from (torch's on CPU and CUDA, Python's, NumPy's) is put back afterwards, so the run's
shuffling, dropout and augmentation are those of a run that never looked: resume stays exact.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch


@contextlib.contextmanager
def untouched_random_state() -> Iterator[None]:
    """Restores torch's (CPU and CUDA), Python's and NumPy's random states on exit."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy

        states["numpy"] = numpy.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a torch dependency in practice
        numpy = None
    try:
        yield
    finally:
        torch.set_rng_state(states["torch"])
        random.setstate(states["python"])
        if "cuda" in states:
            torch.cuda.set_rng_state_all(states["cuda"])
        if numpy is not None:
            numpy.random.set_state(states["numpy"])


def train_batches(trainer: pl.Trainer) -> Iterator[Any]:
    """Batches of the Trainer's (first) train dataloader from a fresh iterator, on the module's device."""
    loaders = getattr(trainer.train_dataloader, "flattened", None) or [trainer.train_dataloader]
    for batch in loaders[0]:
        yield trainer.strategy.batch_to_device(batch, dataloader_idx=0)  # the module's transfer hooks too


def forward_only(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Callable[[Any], None]:
    """``run(batch)``: the module's ``training_step`` on ``batch`` in eval mode (no dropout), under the run's
    precision, without gradients, with ``self.log`` muted (the loop's logging is not set up yet)."""
    def run(batch: Any) -> None:
        muted = {"log": lambda *a, **k: None, "log_dict": lambda *a, **k: None}
        training = pl_module.training
        pl_module.__dict__.update(muted)
        pl_module.eval()
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                pl_module.training_step(batch, 0)
        finally:
            pl_module.train(training)
            for name in muted:
                pl_module.__dict__.pop(name, None)
    return run
