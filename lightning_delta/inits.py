"""Initial values of delta tensors (seeded per delta, drawn on the CPU) and shape checks of imported ones."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_delta.errors import DeltaStateError


def as_shape(tensor: torch.Tensor | None, shape: torch.Size | tuple[int, ...], name: str) -> torch.Tensor:
    """An imported tensor in ``shape``, where only the layout differs: singleton dimensions (PEFT's
    ``(1, in)`` IA3 vector, ``(out, r, 1, 1)`` conv factor) or a flattened kernel (``(r, in, kh, kw)``).
    A tensor with other dimensions (e.g. transposed) is refused rather than reshaped into garbage.

    Raises:
        DeltaStateError: missing, or another shape; the message names ``name`` and both shapes.
    """
    shape = tuple(shape)
    if tensor is None:
        raise DeltaStateError(f"the adapter has no {name!r} (expected shape {shape})")
    have = tuple(tensor.shape)
    same = have == shape or [d for d in have if d != 1] == [d for d in shape if d != 1] \
        or (tensor.dim() > 2 and tuple(tensor.flatten(1).shape) == shape)
    if not same:
        raise DeltaStateError(f"the adapter's {name!r} has shape {have}; this delta needs {shape}: it was saved"
                              " for other dimensions or transposed, and is refused rather than reshaped")
    return tensor.reshape(shape)


def fill_(param: torch.Tensor, draw: Callable[[torch.Tensor], Any]) -> None:
    """Fills ``param`` with values ``draw`` writes into a CPU tensor (meta tensors stay empty)."""
    if param.device.type != "meta":
        values = torch.empty(param.shape, dtype=param.dtype)
        draw(values)
        with torch.no_grad():
            param.copy_(values.to(param.device))


def kaiming_(param: torch.Tensor, generator: torch.Generator) -> None:
    """Kaiming-uniform as ``nn.Linear`` initialises its weight, drawn from ``generator``."""
    fill_(param, lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator))


def delta_seed(seed: int, path: str) -> int:
    """The initialisation seed of the delta at dotted ``path`` in a run seeded with ``seed``.

    Every rank that attaches the same delta with the same seed draws the same initial values,
    so no broadcast is needed (FSDP does not broadcast initial values).
    """
    return (seed * 1_000_003 + zlib.crc32(path.encode())) % 2**63
