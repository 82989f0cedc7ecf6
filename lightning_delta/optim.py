"""Optimizer parameter groups from the attached deltas: per-method learning rates, LoRA+, and no
weight decay where decay makes no sense (biases, norms, scales, prompt and prefix embeddings)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from lightning_delta.core import DeltaConfig, iter_deltas
from lightning_delta.handle import trainable_parameters
from lightning_delta.methods import default_lr, peft_reader

#: Rate of trainable parameters when there is no delta to take one from and none is named.
DEFAULT_LR = 1e-3


def method_lr(config: DeltaConfig) -> float:
    """A delta's own peak learning rate: its config's ``lr`` (each method's default is its recommended rate).

    A PEFT-backend delta (``peft_config=``) left at ``lr=None`` takes the rate of the native method of the
    same PEFT type (a PEFT prompt tuning config trains at prompt tuning's rate).
    """
    if config.lr is not None:
        return config.lr
    native = peft_reader(getattr(config, "peft", None) or {})
    return default_lr(native) if native is not None else DEFAULT_LR


def param_groups(
    model: nn.Module,
    lr: float | None = None,
    weight_decay: float = 0.0,
    lr_by_method: Mapping[str, float] | None = None,
    loraplus_lr_ratio: float | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups for ``torch.optim`` covering every parameter of ``model`` that requires grad, once.

    A delta's rate is, first found: ``lr_by_method[method]``, ``lr``, its config's ``lr`` (each method's
    recommended rate unless set, see :func:`method_lr`). Trainable parameters outside deltas (a classifier
    head, modules trained whole) take ``lr``, or without it the rate of the first delta.

    Args:
        model: the model (or LightningModule) with deltas attached and the backbone frozen.
        lr: one learning rate for every parameter, or ``None`` for each delta's own.
        weight_decay: decay for weight matrices (delta factors, trainable heads' weights).
        lr_by_method: learning rates per delta method, e.g. ``{"prompt": 3e-2}``; wins over ``lr``.
        loraplus_lr_ratio: LoRA+ (Hayou et al., 2024): ``B`` of LoRA/DoRA learns this many times faster.

    Returns:
        Groups with ``params``, ``lr`` and ``weight_decay``, merged where those are equal.
    """
    rates = dict(lr_by_method or {})
    settings: dict[int, tuple[float, float]] = {}
    others = lr
    for d in iter_deltas(model):
        method = d.module.config.method
        own = rates.get(method, lr if lr is not None else method_lr(d.module.config))
        others = own if others is None else others
        for name, p in d.module.named_parameters():
            rate = own
            if loraplus_lr_ratio and name in d.module.config.loraplus_params:
                rate *= loraplus_lr_ratio
            decays = d.module.config.decays and p.dim() >= 2
            settings[id(p)] = (rate, weight_decay if decays else 0.0)
    others = DEFAULT_LR if others is None else others
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for p in trainable_parameters(model):
        key = settings.get(id(p), (others, weight_decay if p.dim() >= 2 else 0.0))
        groups.setdefault(key, []).append(p)
    return [{"params": params, "lr": rate, "weight_decay": decay} for (rate, decay), params in groups.items()]
