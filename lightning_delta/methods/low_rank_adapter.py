"""Low-rank adapters (Mahabadi et al., 2021, the Compacter paper's LRA): bottleneck adapters whose
down and up projections are each a product of two rank-``rank`` factors.

Placement and init as :mod:`~lightning_delta.methods.adapter` (the identity at init: the up
projection's outer factor starts at zero). Parameters per target of width ``d`` with bottleneck
``b`` and rank ``k``: ``2 * k * (d + b) + b + d``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lightning_delta.inits import kaiming_
from lightning_delta.methods.adapter import ACTIVATIONS, Adapter, AdapterConfig, out_features


@dataclass
class LowRankAdapterConfig(AdapterConfig):
    """Adapter hyper-parameters plus the rank of each projection.

    Args:
        rank: rank of the down and up projections (> 0, at most ``bottleneck_dim``).
    """

    method = "low_rank_adapter"
    lr: float = field(default=0.01, kw_only=True)  # benchmarks.quality --sweep

    rank: int = 1

    def validate(self) -> None:
        super().validate()
        ok = isinstance(self.rank, int) and not isinstance(self.rank, bool) and 0 < self.rank <= self.bottleneck_dim
        self.check_range("rank", self.rank, ok, f"an integer in [1, bottleneck_dim={self.bottleneck_dim}]")

    def build(self, module: nn.Module, seed: int, path: str = "") -> LowRankAdapter:
        return LowRankAdapter(self, module).seeded(seed)


class LowRankAdapter(Adapter):
    """``y + up(act(down(y)))`` with ``down = down_left @ down_right`` and ``up = up_left @ up_right``."""

    def __init__(self, config: LowRankAdapterConfig, target: nn.Module) -> None:
        super(Adapter, self).__init__(config, target)
        width, bottleneck, rank = out_features(target), config.bottleneck_dim, config.rank
        self.down_left = nn.Parameter(torch.empty(bottleneck, rank, **self.factory))
        self.down_right = nn.Parameter(torch.empty(rank, width, **self.factory))
        self.down_bias = nn.Parameter(torch.zeros(bottleneck, **self.factory))
        self.up_left = nn.Parameter(torch.zeros(width, rank, **self.factory))
        self.up_right = nn.Parameter(torch.empty(rank, bottleneck, **self.factory))
        self.up_bias = nn.Parameter(torch.zeros(width, **self.factory))
        self.activation = config.activation

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Left/right factors Kaiming-uniform from ``init_seed``; ``up_left`` and the biases zero."""
        generator = self.generator()
        for p in (self.down_bias, self.up_left, self.up_bias):
            p.zero_()
        for p in (self.down_left, self.down_right, self.up_right):
            kaiming_(p, generator)

    def forward(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """output ``(..., d)`` -> ``(..., d)``, computed in the output's dtype."""
        dtype = output.dtype
        down = F.linear(F.linear(output, self.down_right.to(dtype)), self.down_left.to(dtype), self.down_bias.to(dtype))
        hidden = ACTIVATIONS[self.activation](down)
        up = F.linear(F.linear(hidden, self.up_right.to(dtype)), self.up_left.to(dtype), self.up_bias.to(dtype))
        return output + up
