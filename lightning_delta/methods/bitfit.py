"""BitFit (Ben Zaken et al., 2022): train only the biases.

Each target gets a zero-initialised bias offset ``delta`` added to its output, so the
effective bias is ``b + delta`` (``0 + delta`` where the target had no bias). Training
``delta`` is training the bias itself, with the same gradients, while the backbone's
names and values stay untouched; ``merge()`` folds ``delta`` into the target's bias.
Supported targets: Linear-like modules, ``nn.Conv1d/2d/3d``, ``nn.LayerNorm`` and
RMSNorm-style norms. The preset (``targets=None``) is ``"all"``: every supported
module but the output head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_delta.core import Delta, DeltaConfig
from lightning_delta.targets import ALL, is_linear_like

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    named_norm = type(module).__name__.endswith(("LayerNorm", "RMSNorm"))
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or (
        named_norm and isinstance(weight, torch.Tensor) and weight.dim() == 1
    )


@dataclass
class BitFitConfig(DeltaConfig):
    """BitFit has no hyper-parameters beyond where it attaches."""

    method = "bitfit"
    decays = False  # offsets, scales or embeddings: no weight decay
    lr: float = field(default=0.003, kw_only=True)  # benchmarks.quality --sweep
    supported_types = "Linear-like modules, nn.Conv1d/2d/3d, nn.LayerNorm and RMSNorm-style norms"

    def supports(self, module: nn.Module) -> bool:
        return is_linear_like(module) or isinstance(module, _CONV) or _is_norm(module)

    def preset(self, model: nn.Module) -> list[str]:
        return [ALL]

    def build(self, module: nn.Module, seed: int, path: str = "") -> BitFit:
        return BitFit(self, module)


class BitFit(Delta):
    """A trainable bias offset on one module's output."""

    mergeable = True

    def __init__(self, config: BitFitConfig, target: nn.Module):
        super().__init__(config, target)
        weight = target.weight
        if isinstance(target, _CONV):
            shape: tuple[int, ...] = (target.out_channels,) + (1,) * (weight.dim() - 2)
        elif isinstance(target, nn.Linear):
            shape = (target.out_features,)
        elif is_linear_like(target):  # Conv1D: weight (in, out)
            shape = (weight.shape[1],)
        else:
            shape = tuple(weight.shape)
        self.bias = nn.Parameter(torch.zeros(shape, **self.factory))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Zero offsets: the attached model computes what the backbone did."""
        self.bias.zero_()

    def forward(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """``output + bias``, broadcast over the leading dims (over H, W for convs)."""
        return output + self.bias.to(output.dtype)

    def merge_blocker(self, target: nn.Module) -> str | None:
        if getattr(target, "bias", None) is None:
            return f"{type(target).__name__} has no bias to fold the offset into"
        return None

    @torch.no_grad()
    def merge(self, target: nn.Module) -> None:
        if not self.merged:
            target.bias += self.bias.reshape(target.bias.shape).to(target.bias.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self, target: nn.Module) -> None:
        if self.merged:
            target.bias -= self.bias.reshape(target.bias.shape).to(target.bias.dtype)
            self.merged = False
