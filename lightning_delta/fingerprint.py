"""The backbone's fingerprint: a few sampled values per tensor, recorded with a delta and compared at load."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_delta.core import iter_deltas
from lightning_delta.errors import DeltaStateError
from lightning_delta.state import canonical, delta_owners, is_under, state_tensors
from lightning_delta.tensors import is_partitioned, is_quantized

_SAMPLED_TENSORS = 4
_SAMPLES_PER_TENSOR = 16


def _samples(tensor: torch.Tensor) -> list[float]:
    flat = tensor.detach().reshape(-1)
    n = min(_SAMPLES_PER_TENSOR, flat.numel())
    index = (torch.arange(n) * (flat.numel() - 1) // max(n - 1, 1)).to(flat.device)
    return [float(v) for v in flat[index].float().cpu()]


def backbone_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's own tensors by canonical key (delta tensors left out, PEFT's renaming undone)."""
    owners = delta_owners(model)
    return {canonical(k): t for k, t in state_tensors(model).items() if not is_under(k, owners)}


def weight_offsets(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Per canonical backbone key, what attached deltas subtracted from that weight (PiSSA / OLoRA residuals)."""
    out: dict[str, list[torch.Tensor]] = {}
    for d in iter_deltas(model):
        offset = d.module.weight_offset()
        if offset is not None:
            out.setdefault(canonical(f"{d.target_path}.weight" if d.target_path else "weight"), []).append(offset)
    return out


def _original_samples(key: str, tensor: torch.Tensor, offsets: Mapping[str, list[torch.Tensor]]) -> list[float]:
    """Sampled values of ``tensor`` as the backbone had them before any delta changed it."""
    if key not in offsets:
        return _samples(tensor)
    original = tensor.detach().float()
    for offset in offsets[key]:
        original = original + offset.to(original.device)
    return _samples(original)


def logical_shape(tensor: torch.Tensor) -> list[int]:
    """The shape a tensor stands for: a bitsandbytes 4-bit weight stores packed bytes but records it, a
    DeepSpeed ZeRO-3 parameter is an empty placeholder that records it as ``ds_shape``."""
    quant_state = getattr(tensor, "quant_state", None)
    shape = getattr(quant_state, "shape", None) or getattr(tensor, "ds_shape", None)
    return list(shape) if shape is not None else list(tensor.shape)


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """A cheap description of a backbone: names and shapes of its own tensors, its source, a few values.

    Delta tensors are left out; values are sampled from frozen floating-point parameters only
    (trainable ones change in training), so the fingerprint is stable while training, and as the
    backbone had them before attach (a PiSSA / OLoRA residual is added back). Sharded
    (DTensor, ZeRO-3) parameters are not sampled: that would gather them; quantized (NF4) ones neither:
    their values are rounded. Shapes are recorded for both (the logical, dequantized shape), so a
    delta trained on a 4-bit backbone fits the same backbone in floating point and back.
    """
    tensors = backbone_tensors(model)
    frozen = [
        k
        for k, t in tensors.items()
        if isinstance(t, nn.Parameter) and not t.requires_grad and t.is_floating_point()
        and t.device.type != "meta" and not is_partitioned(t) and not is_quantized(t)
    ]
    last = len(frozen) - 1
    picks = [frozen[round(i * last / (_SAMPLED_TENSORS - 1))] for i in range(_SAMPLED_TENSORS)] if frozen else []
    config = getattr(model, "config", None)
    offsets = weight_offsets(model)
    return {
        "class": type(model).__name__,
        "source": getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None) or None,
        "shapes": {k: logical_shape(t) for k, t in tensors.items()},
        "samples": {k: _original_samples(k, tensors[k], offsets) for k in dict.fromkeys(picks)},
    }


def _close(recorded: list[float], current: list[float]) -> bool:
    """Sampled values agree up to bf16 rounding (so a dtype change is not a different backbone)."""
    return len(recorded) == len(current) and all(
        math.isclose(a, b, rel_tol=2e-2, abs_tol=1e-3) for a, b in zip(recorded, current, strict=True)
    )


def compare_fingerprint(recorded: Mapping[str, Any], model: nn.Module) -> list[str]:
    """Checks a recorded fingerprint against ``model``.

    Returns:
        Warnings about sampled values that differ (other pretrained weights, legitimately or not).

    Raises:
        DeltaStateError: tensor names or shapes differ (another architecture or size).
    """
    tensors = backbone_tensors(model)
    shapes = recorded.get("shapes", {})
    problems = [f"{k}: missing from this model" for k in shapes if k not in tensors]
    problems += [f"{k}: not in the checkpoint's backbone" for k in tensors if k not in shapes]
    problems += [
        f"{k}: shape {tuple(logical_shape(tensors[k]))} here, {tuple(s)} in the checkpoint's backbone"
        for k, s in shapes.items()
        if k in tensors and logical_shape(tensors[k]) != list(s)
    ]
    if problems:
        raise DeltaStateError(
            f"the checkpoint was made for another backbone ({recorded.get('class')} from"
            f" {recorded.get('source')!r}); {len(problems)} tensors differ, first: {problems[:5]}."
            " Build the backbone the checkpoint names, then load the delta"
        )
    offsets = weight_offsets(model)
    differ = [
        k
        for k, values in recorded.get("samples", {}).items()
        if not is_partitioned(tensors[k]) and not is_quantized(tensors[k])
        and not _close(values, _original_samples(k, tensors[k], offsets))
    ]
    if differ:
        return [
            f"backbone weights differ from those the delta was trained on ({recorded.get('source')!r}), e.g. in"
            f" {differ[:3]}: names and shapes fit, but the delta may not work as trained on these weights"
        ]
    return []
