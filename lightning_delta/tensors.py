"""Tensors the engine treats apart: quantized weights, recognised by type name without importing their library."""

from __future__ import annotations

from typing import Any

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
