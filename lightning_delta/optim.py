"""Optimizer parameter groups from the attached deltas: per-method learning rates, LoRA+, and no
weight decay where decay makes no sense (biases, norms, scales, prompt and prefix embeddings)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from lightning_delta.core import iter_deltas
from lightning_delta.handle import trainable_parameters

#: Delta tensors that are offsets, scales or embeddings rather than weight matrices: never decayed.
NO_DECAY_METHODS = frozenset({"bitfit", "layernorm", "ia3", "prompt", "prefix", "new_tokens"})


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    lr_by_method: Mapping[str, float] | None = None,
    loraplus_lr_ratio: float | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups for ``torch.optim`` covering every parameter of ``model`` that requires grad, once.

    Args:
        model: the model (or LightningModule) with deltas attached and the backbone frozen.
        lr: the base learning rate.
        weight_decay: decay for weight matrices (delta factors, trainable heads' weights).
        lr_by_method: learning rates per delta method, e.g. ``{"prompt": 3e-2}`` (prompt and prefix
            tuning usually want much higher rates than LoRA).
        loraplus_lr_ratio: LoRA+ (Hayou et al., 2024): ``B`` of LoRA/DoRA learns this many times faster.

    Returns:
        Groups with ``params``, ``lr`` and ``weight_decay``, merged where those are equal.
    """
    rates = dict(lr_by_method or {})
    settings: dict[int, tuple[float, float]] = {}
    for d in iter_deltas(model):
        method = d.module.config.method
        for name, p in d.module.named_parameters():
            rate = rates.get(method, lr)
            if loraplus_lr_ratio and method in ("lora", "dora") and name == "B":
                rate *= loraplus_lr_ratio
            decays = method not in NO_DECAY_METHODS and p.dim() >= 2
            settings[id(p)] = (rate, weight_decay if decays else 0.0)
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for p in trainable_parameters(model):
        key = settings.get(id(p), (lr, weight_decay if p.dim() >= 2 else 0.0))
        groups.setdefault(key, []).append(p)
    return [{"params": params, "lr": rate, "weight_decay": decay} for (rate, decay), params in groups.items()]
