"""Attach and detach: every delta built before the model is touched, removed leaving the backbone as before."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from lightning_delta.core import AttachedDelta, Delta, DeltaConfig, iter_deltas
from lightning_delta.errors import DeltaConfigError, DeltaError, MergeError, UnsupportedModuleError
from lightning_delta.inits import delta_seed


def _free_name(model: nn.Module, config: DeltaConfig) -> str:
    taken = {d.name for d in iter_deltas(model)}
    if config.name is not None:
        if config.name in taken:
            raise DeltaConfigError(
                f"a delta named {config.name!r} is already attached; give the new one another name"
                f" (name='{config.name}_2') or detach the old one first"
            )
        return config.name
    name, n = config.method, 1
    while name in taken:
        n += 1
        name = f"{config.method}_{n}"
    return name


def attach_config(model: nn.Module, config: DeltaConfig, seed: int | None = None) -> str:
    """Attaches one delta described by ``config`` to ``model``; returns the delta's name.

    Every target is resolved and every delta built before the model is touched, so a
    failure leaves the model as it was. Random initial values derive from ``seed`` (default:
    ``torch.initial_seed()``) and each delta's path, see :func:`delta_seed`.
    """
    seed = torch.initial_seed() if seed is None else seed
    names = config.target_names(model)
    name = _free_name(model, config)
    built: list[tuple[nn.Module, Delta]] = []
    for target_name in names:
        target = model.get_submodule(target_name)
        if hasattr(target, name):
            raise DeltaConfigError(
                f"{target_name!r} already has an attribute {name!r}; pass another delta name, e.g. name='{name}_delta'"
            )
        _refuse_zero3_partition(target, target_name)
        built.append((target, config.build(target, delta_seed(seed, f"{target_name}.{name}"), target_name)))
    config.tie([delta for _, delta in built])
    config = dataclasses.replace(config, name=name)
    placed: list[tuple[nn.Module, Delta]] = []
    try:
        for target, delta in built:
            delta.config = config
            target.add_module(name, delta)
            placed.append((target, delta))
            delta.hook_into(target)
            delta.on_attach(target)
    except Exception:  # e.g. a library refusing to hook: leave the model as it was
        for target, delta in placed:
            delta.unhook_from(target)
            delattr(target, name)
        raise
    return name


def _refuse_zero3_partition(target: nn.Module, path: str) -> None:
    """Deltas are shaped from whole weights: a DeepSpeed ZeRO-3 placeholder (built under ``zero.Init``) has none."""
    for key, param in target.named_parameters(recurse=False):
        if hasattr(param, "ds_shape") and param.numel() == 0:
            raise UnsupportedModuleError(
                f"{path or 'the target'}.{key} is a DeepSpeed ZeRO-3 partition (full shape"
                f" {tuple(param.ds_shape)}), built under deepspeed.zero.Init: deltas attach to whole weights. Build"
                " or load the backbone in the LightningModule's __init__, not in configure_model, so DeltaCallback"
                " attaches before DeepSpeed partitions it (the strategy still shards it, deltas included)"
            )


def detach_delta(model: nn.Module, name: str) -> None:
    """Removes every module of the delta ``name``, unmerging first; the backbone is as before attach."""
    found = list(iter_deltas(model, name))
    if not found:
        names = sorted({d.name for d in iter_deltas(model)})
        raise DeltaError(f"no delta named {name!r} is attached; attached deltas: {names or 'none'}")
    for d in found:
        target = model.get_submodule(d.target_path)
        if d.module.merged:
            d.module.unmerge(target)
        d.module.on_detach(target)
        d.module.unhook_from(target)
        delattr(target, d.name)


def check_merge(model: nn.Module, deltas: Iterable[AttachedDelta]) -> None:
    """Raises :class:`MergeError` naming every delta that cannot merge, before anything is merged."""
    blocked = [
        f"{d.path} ({reason})"
        for d in deltas
        if (reason := d.module.merge_blocker(model.get_submodule(d.target_path))) is not None
    ]
    if blocked:
        raise MergeError(
            f"cannot merge {len(blocked)} delta module(s): {', '.join(blocked[:5])}."
            " Merge only deltas that support it: merge(names=[...])"
        )
