"""Compacter (Mahabadi et al., 2021): adapters whose projections are parameterised hypercomplex
multiplication (PHM) layers, ``W = sum_i A_i kron (s_i t_i)``, with the ``n`` rules ``A_i``
(each ``n x n``) shared by every adapter of one attach and low-rank ``s_i t_i`` per adapter.

Placement and init as :mod:`~lightning_delta.methods.adapter` (identity at init: the up
projection's ``t`` factors start at zero). Needs ``d`` and ``bottleneck_dim`` divisible by
``phm_dim``. Parameters per target of width ``d``: ``phm_dim * rank * 2 * (d + b) / phm_dim``
``+ b + d``, plus ``phm_dim ** 3`` shared once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lightning_delta.core import Delta
from lightning_delta.errors import DeltaConfigError
from lightning_delta.inits import fill_
from lightning_delta.methods.adapter import ACTIVATIONS, AdapterConfig, out_features


@dataclass
class CompacterConfig(AdapterConfig):
    """Adapter hyper-parameters plus the PHM dimension and rank.

    Args:
        phm_dim: number of hypercomplex rules ``n``; divides ``bottleneck_dim`` and the width.
        rank: rank of each ``s_i t_i`` factor.
    """

    method = "compacter"
    lr: float = field(default=0.01, kw_only=True)  # benchmarks.quality --sweep

    phm_dim: int = 4
    rank: int = 1

    def validate(self) -> None:
        super().validate()
        for name in ("phm_dim", "rank"):
            value = getattr(self, name)
            self.check_range(name, value, isinstance(value, int) and not isinstance(value, bool) and value > 0,
                             "a positive integer")
        self.check_range("bottleneck_dim", self.bottleneck_dim, self.bottleneck_dim % self.phm_dim == 0,
                         f"divisible by phm_dim={self.phm_dim}")

    def build(self, module: nn.Module, seed: int, path: str = "") -> CompacterAdapter:
        if out_features(module) % self.phm_dim:
            raise DeltaConfigError(
                f"compacter: {path!r} has width {out_features(module)}, not divisible by phm_dim={self.phm_dim};"
                " pick a phm_dim that divides the hidden size"
            )
        return CompacterAdapter(self, module).seeded(seed)

    def tie(self, deltas: list[Delta]) -> None:
        """Every adapter of this attach uses the first one's rules."""
        for delta in deltas[1:]:
            delta.rules = deltas[0].rules


class CompacterAdapter(Delta):
    """``y + up(act(down(y)))`` with PHM down and up projections."""

    def __init__(self, config: CompacterConfig, target: nn.Module) -> None:
        super().__init__(config, target)
        n, k, d, b = config.phm_dim, config.rank, out_features(target), config.bottleneck_dim
        self.rules = nn.Parameter(torch.empty(n, n, n, **self.factory))
        self.down_s = nn.Parameter(torch.empty(n, b // n, k, **self.factory))
        self.down_t = nn.Parameter(torch.empty(n, k, d // n, **self.factory))
        self.down_bias = nn.Parameter(torch.zeros(b, **self.factory))
        self.up_s = nn.Parameter(torch.empty(n, d // n, k, **self.factory))
        self.up_t = nn.Parameter(torch.zeros(n, k, b // n, **self.factory))
        self.up_bias = nn.Parameter(torch.zeros(d, **self.factory))
        self.activation = config.activation

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Rules and factors Glorot-uniform from ``init_seed``, ``up_t`` and biases zero: the identity at init."""
        generator = self.generator()
        for p in (self.down_bias, self.up_t, self.up_bias):
            p.zero_()
        for p in (self.rules, self.down_s, self.down_t, self.up_s):
            bound = math.sqrt(6.0 / (p.shape[-1] + p.shape[-2]))
            fill_(p, lambda t, b=bound: t.uniform_(-b, b, generator=generator))

    def _phm(self, s: torch.Tensor, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``sum_i rules_i kron (s_i @ t_i)``: a ``(n * rows, n * cols)`` weight."""
        blocks = torch.bmm(s, t)  # (n, rows, cols)
        return torch.einsum("iab,irc->arbc", self.rules, blocks).reshape(
            self.rules.shape[1] * blocks.shape[1], self.rules.shape[2] * blocks.shape[2]).to(dtype)

    def forward(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """output ``(..., d)`` -> ``(..., d)``, computed in the output's dtype."""
        dtype = output.dtype
        hidden = ACTIVATIONS[self.activation](
            F.linear(output, self._phm(self.down_s, self.down_t, dtype), self.down_bias.to(dtype)))
        return output + F.linear(hidden, self._phm(self.up_s, self.up_t, dtype), self.up_bias.to(dtype))
