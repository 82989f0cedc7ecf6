"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021): ``y + up(act(down(y)))``.

Each adapter sits on the output of a projection, before the block's residual connection: after
the attention output and the feed-forward output of every block (``placement="houlsby"``), or
after the feed-forward output only (``"pfeiffer"``). ``up`` starts at zero, so the attached model
computes exactly what the backbone did. Parameters per target of width ``d``:
``2 * d * bottleneck_dim + bottleneck_dim + d``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lightning_delta.core import Delta, DeltaConfig
from lightning_delta.inits import kaiming_
from lightning_delta.targets import ATTENTION_OUTPUT_PRESETS, FFN_OUTPUT_PRESETS, is_linear_like, preset

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
PLACEMENTS = ("houlsby", "pfeiffer")


def out_features(module: nn.Module) -> int:
    """Output width of a Linear-like module (``Conv1D`` stores its weight as ``(in, out)``)."""
    return module.out_features if isinstance(module, nn.Linear) else module.weight.shape[1]


@dataclass
class AdapterConfig(DeltaConfig):
    """Bottleneck adapter hyper-parameters.

    Args:
        bottleneck_dim: width of the bottleneck (> 0).
        activation: non-linearity between down and up projection: relu, gelu, silu or tanh.
        placement: ``"houlsby"`` (attention and feed-forward outputs) or ``"pfeiffer"`` (feed-forward only),
            used when ``targets`` is ``None``.
    """

    method = "adapter"
    lr: float = field(default=0.003, kw_only=True)  # benchmarks.quality --sweep
    supported_types = "nn.Linear and transformers Conv1D (the adapter reads their output)"

    bottleneck_dim: int = 64
    activation: str = "relu"
    placement: str = "houlsby"

    def validate(self) -> None:
        ok = isinstance(self.bottleneck_dim, int) and not isinstance(self.bottleneck_dim, bool)
        self.check_range("bottleneck_dim", self.bottleneck_dim, ok and self.bottleneck_dim > 0,
                         "a positive integer, e.g. bottleneck_dim=64")
        self.check_range("activation", self.activation, self.activation in ACTIVATIONS, f"one of {list(ACTIVATIONS)}")
        self.check_range("placement", self.placement, self.placement in PLACEMENTS, f"one of {list(PLACEMENTS)}")

    def supports(self, module: nn.Module) -> bool:
        return is_linear_like(module)

    def preset(self, model: nn.Module) -> list[str]:
        ffn = preset(FFN_OUTPUT_PRESETS, model, self.method, "feed-forward outputs")
        if self.placement == "pfeiffer":
            return ffn
        return preset(ATTENTION_OUTPUT_PRESETS, model, self.method, "attention outputs") + ffn

    def build(self, module: nn.Module, seed: int, path: str = "") -> Adapter:
        return Adapter(self, module).seeded(seed)


class Adapter(Delta):
    """``y + up(act(down(y)))`` on a target's output ``y`` of width ``d``."""

    def __init__(self, config: AdapterConfig, target: nn.Module) -> None:
        super().__init__(config, target)
        width, bottleneck = out_features(target), config.bottleneck_dim
        self.down_weight = nn.Parameter(torch.empty(bottleneck, width, **self.factory))
        self.down_bias = nn.Parameter(torch.zeros(bottleneck, **self.factory))
        self.up_weight = nn.Parameter(torch.zeros(width, bottleneck, **self.factory))
        self.up_bias = nn.Parameter(torch.zeros(width, **self.factory))
        self.activation = config.activation

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``down`` Kaiming-uniform from ``init_seed``, ``up`` and the biases zero: the identity at init."""
        for p in (self.down_bias, self.up_weight, self.up_bias):
            p.zero_()
        kaiming_(self.down_weight, self.generator())

    def forward(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """output ``(..., d)`` -> ``(..., d)``, computed in the output's dtype."""
        dtype = output.dtype
        hidden = ACTIVATIONS[self.activation](F.linear(output, self.down_weight.to(dtype), self.down_bias.to(dtype)))
        return output + F.linear(hidden, self.up_weight.to(dtype), self.up_bias.to(dtype))
