"""A look at the first training batches before training starts, leaving the run as if it had not looked.

Data-driven initialisations (LoRA ``init="eva"``, ``"lora_ga"``) run the model on a few batches of the Trainer's
train dataloader at fit start. The batches come from a fresh iterator of that dataloader (the
loop's own is untouched), and every random generator a dataloader or a ``training_step`` may
draw from (torch's on CPU and CUDA, Python's, NumPy's) is put back afterwards, so the run's
shuffling, dropout and augmentation are those of a run that never looked: resume stays exact.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader


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
    """Batches as ``training_step`` gets them, from fresh iterators of the Trainer's train dataloaders (several
    combine as the fit loop does), on the module's device."""
    loaders = trainer.train_dataloader
    if isinstance(loaders, (Mapping, Sequence)) and not isinstance(loaders, DataLoader):
        loaders = (batch for batch, _, _ in CombinedLoader(loaders, "max_size_cycle"))
    for batch in loaders:
        yield trainer.strategy.batch_to_device(batch, dataloader_idx=0)  # the module's transfer hooks too


def forward_only(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Callable[..., None]:
    """``run(batch, grads_of=None)``: the module's ``training_step`` on ``batch`` under the run's precision, with
    ``self.log`` muted (the loop's logging is not set up yet). Without ``grads_of``: in eval mode (no dropout),
    without gradients. With ``grads_of`` (tensors): in training mode, the loss run backward into those tensors
    alone (every other parameter's ``requires_grad`` off meanwhile, so no gradient or DDP hook fires)."""
    def run(batch: Any, grads_of: list[torch.Tensor] | None = None) -> None:
        muted = {"log": lambda *a, **k: None, "log_dict": lambda *a, **k: None}
        training = pl_module.training
        parameters = list(pl_module.parameters())
        wanted = {id(t) for t in grads_of or ()}
        flags = [p.requires_grad for p in parameters]
        pl_module.__dict__.update(muted)
        pl_module.train(grads_of is not None)
        try:
            with torch.set_grad_enabled(grads_of is not None), trainer.precision_plugin.forward_context():
                if grads_of is not None:
                    for p in parameters:
                        p.requires_grad_(id(p) in wanted)
                out = pl_module.training_step(batch, 0)
                if grads_of is not None:
                    (out["loss"] if isinstance(out, dict) else out).backward()
        finally:
            for p, flag in zip(parameters, flags):
                p.requires_grad_(flag)
            pl_module.train(training)
            for name in muted:
                pl_module.__dict__.pop(name, None)
    return run
