"""Tensors the engine treats apart: quantized weights (known by type name) and tensors spread over ranks."""

from __future__ import annotations

from typing import Any

import torch

#: Type names of quantized weights: torchao's NF4, bitsandbytes' 4-bit and 8-bit parameters.
QUANTIZED_TYPES = frozenset({"NF4Tensor", "Params4bit", "Int8Params"})


def is_quantized(tensor: Any) -> bool:
    """Whether ``tensor`` is a quantized weight (torchao's ``NF4Tensor``, bitsandbytes' 4-/8-bit
    parameters); checked without importing either library."""
    return type(tensor).__name__ in QUANTIZED_TYPES


def is_partitioned(tensor: Any) -> bool:
    """Whether ``tensor``'s values live on several ranks: a DTensor (FSDP2, tensor parallel) or a DeepSpeed
    ZeRO-3 partition. Reading its values would need communication."""
    return type(tensor).__name__ == "DTensor" or type(getattr(tensor, "data", None)).__name__ == "DTensor" \
        or hasattr(tensor, "ds_shape")


def gathered(value: Any) -> Any:
    """A DTensor gathered in full (every shard) on the CPU; other values unchanged."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        value = value.full_tensor()
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value


def distributed_like(value: Any, reference: Any) -> Any:
    """``value`` (a full tensor) laid out like ``reference`` (a DTensor: this rank's shard of it)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(reference, DTensor) and isinstance(value, torch.Tensor) and value.shape == reference.shape:
        full = value.to(device=reference.device, dtype=reference.dtype)
        return distribute_tensor(full, reference.device_mesh, reference.placements, src_data_rank=None)
    return value
