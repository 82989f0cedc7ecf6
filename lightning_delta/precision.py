"""Dtype policy under a half-precision backbone: everything trained stays fp32.

* Delta modules keep their ``storage_dtype`` (fp32 by default) through any ``.to()`` / ``.half()``
  (see :meth:`lightning_delta.core.Delta._apply`) and cast at their boundary.
* Under Lightning's ``BitsandbytesPrecision`` (QLoRA), the plugin swaps every ``nn.Linear`` for a
  new 4-/8-bit layer object after the deltas were attached: :class:`KeepDeltasThroughLayerSwap`
  moves each delta onto its target's replacement, and modules trained whole are left unquantized.
* Backbone modules made trainable (``trainable=["classifier"]``) would otherwise be trained in
  bf16/fp16, losing small updates: :func:`keep_trainable_fp32` gives them fp32 parameters (the
  optimizer's master copy) and runs them in fp32 between two casts, so their neighbours still
  see the half-precision dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from lightning_delta.core import iter_deltas
from lightning_delta.handle import DeltaModel
from lightning_delta.state import TRAINABLE_ATTR
from lightning_delta.targets import candidate_modules


class Fp32Boundary:
    """Forward hooks that run one module in fp32 inside a model of dtype ``dtype``."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    @staticmethod
    def _cast(value: Any, dtype: torch.dtype) -> Any:
        return tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, value)

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Forward pre-hook: floating inputs to fp32."""
        return self._cast(args, torch.float32), self._cast(kwargs, torch.float32)

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Forward hook: floating outputs back to the model's dtype."""
        return self._cast(output, self.dtype)


def _has_boundary(module: nn.Module) -> bool:
    return any(isinstance(getattr(h, "__self__", None), Fp32Boundary) for h in module._forward_hooks.values())


def keep_trainable_fp32(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Gives every trainable backbone parameter of ``model`` fp32 storage and runs its module in fp32.

    Call it after the model was cast to ``dtype`` and before the optimizer is built. Parameter
    objects are kept (``.data`` is replaced), so references to them stay valid.

    Returns:
        The names of the modules now running in fp32.
    """
    changed = []
    for name, module in [("", model), *candidate_modules(model)]:  # every module outside the deltas
        own = [p for p in module.parameters(recurse=False) if p.requires_grad and p.is_floating_point()]
        if not own:
            continue
        for param in own:
            param.data = param.data.float()
        if not _has_boundary(module):
            boundary = Fp32Boundary(dtype)
            module.register_forward_pre_hook(boundary.before, with_kwargs=True)
            module.register_forward_hook(boundary.after, with_kwargs=True)
        changed.append(name)
    return changed


class KeepTrainableFp32:
    """Wraps a precision plugin's ``convert_module``: convert, then :func:`keep_trainable_fp32`."""

    def __init__(self, convert_module: Any, dtype: torch.dtype) -> None:
        self.convert_module = convert_module
        self.dtype = dtype

    def __call__(self, module: nn.Module) -> nn.Module:
        module = self.convert_module(module)
        keep_trainable_fp32(module, self.dtype)
        return module


class KeepDeltasThroughLayerSwap:
    """Wraps a precision plugin's ``convert_module`` that replaces layers by new objects (bitsandbytes).

    The replaced layers would drop their delta children and hooks; after the conversion each delta
    moves onto its target's replacement (the deltas stay full-precision modules, untouched by the
    quantization), and the backbone is frozen again (the new layers' parameters default to trainable).
    """

    def __init__(self, convert_module: Any, backbone_path: str) -> None:
        self.convert_module = convert_module
        self.backbone_path = backbone_path

    def __call__(self, module: nn.Module) -> nn.Module:
        placed = [(d, module.get_submodule(d.target_path)) for d in iter_deltas(module)]
        module = self.convert_module(module)
        for d, old in placed:
            new = module.get_submodule(d.target_path)
            if new is old:
                continue
            d.module.unhook_from(old)
            delattr(old, d.name)
            new.add_module(d.name, d.module)
            d.module.hook_into(new)
        backbone = module.get_submodule(self.backbone_path)
        DeltaModel(backbone).freeze_backbone(getattr(backbone, TRAINABLE_ATTR, ()))
        return module
