"""LN-tuning (Qi et al., 2022): train only the gains and biases of the normalisation layers.

Each norm gets zero-initialised offsets ``d_gain`` (and ``d_bias`` where the norm has a bias):
``y + d_gain * normalized(x) + d_bias``, which is the norm with gain ``g + d_gain`` and bias
``b + d_bias``, computed without touching the backbone's tensors. ``merge()`` folds the offsets
in. Supports ``nn.LayerNorm`` and RMSNorm-style norms (``nn.RMSNorm``, ``LlamaRMSNorm``,
``T5LayerNorm``); the preset is every norm of the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lightning_delta.core import Delta, DeltaConfig
from lightning_delta.targets import ALL


def is_rms_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.RMSNorm) or (
        type(module).__name__.endswith(("RMSNorm", "T5LayerNorm")) and isinstance(weight, torch.Tensor)
        and weight.dim() == 1 and getattr(module, "bias", None) is None
    )


def is_layer_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) and module.elementwise_affine


@dataclass
class LayerNormConfig(DeltaConfig):
    """LN-tuning has no hyper-parameters beyond where it attaches (default: every norm)."""

    method = "layernorm"
    decays = False  # offsets, scales or embeddings: no weight decay
    lr: float = field(default=0.01, kw_only=True)  # benchmarks.quality --sweep
    supported_types = "nn.LayerNorm (with affine parameters) and RMSNorm-style norms"

    def supports(self, module: nn.Module) -> bool:
        return is_layer_norm(module) or is_rms_norm(module)

    def preset(self, model: nn.Module) -> list[str]:
        return [ALL]

    def build(self, module: nn.Module, seed: int, path: str = "") -> LayerNormTuning:
        return LayerNormTuning(self, module)


class LayerNormTuning(Delta):
    """Offsets to one norm's gain (and bias)."""

    mergeable = True

    def __init__(self, config: LayerNormConfig, target: nn.Module) -> None:
        super().__init__(config, target)
        shape = target.weight.shape
        self.rms = not is_layer_norm(target)
        self.eps = getattr(target, "variance_epsilon", None) or getattr(target, "eps", None)
        self.d_gain = nn.Parameter(torch.zeros(shape, **self.factory))
        has_bias = getattr(target, "bias", None) is not None
        self.d_bias = nn.Parameter(torch.zeros(shape, **self.factory)) if has_bias else None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.d_gain.zero_()
        if self.d_bias is not None:
            self.d_bias.zero_()

    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.rms:
            eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return F.layer_norm(x, self.d_gain.shape, eps=self.eps)

    def forward(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """x, output ``(..., d)``: ``output + d_gain * normalized(x) + d_bias``."""
        delta = self._normalized(x) * self.d_gain.float()
        if self.d_bias is not None:
            delta = delta + self.d_bias.float()
        return output + delta.to(output.dtype)

    @torch.no_grad()
    def _fold(self, target: nn.Module, sign: float) -> None:
        target.weight += sign * self.d_gain.to(target.weight.dtype)
        if self.d_bias is not None:
            target.bias += sign * self.d_bias.to(target.bias.dtype)

    def merge(self, target: nn.Module) -> None:
        if not self.merged:
            self._fold(target, 1.0)
            self.merged = True

    def unmerge(self, target: nn.Module) -> None:
        if self.merged:
            self._fold(target, -1.0)
            self.merged = False
