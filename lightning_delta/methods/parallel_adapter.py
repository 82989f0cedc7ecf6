"""Parallel adapters (He et al., 2022): a scaled bottleneck beside the feed-forward block,
``h = FFN(x) + scale * up(act(down(x)))``.

The target is the feed-forward module (``mlp`` of GPT-2 and Llama, T5's ``DenseReluDense``).
BERT-style blocks split their feed-forward path over two modules; there the target is the
``*Output(hidden_states, input_tensor)`` module, whose ``input_tensor`` is the feed-forward
input: the adapter adds ``scale * up(act(down(input_tensor)))`` to it, which equals adding it to
the feed-forward output before the residual sum and LayerNorm. ``up`` starts at zero: the
identity at init. Parameters per block of width ``d``: ``2 * d * bottleneck_dim + bottleneck_dim + d``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_delta.core import Delta
from lightning_delta.inits import kaiming_
from lightning_delta.methods.adapter import ACTIVATIONS, AdapterConfig, out_features
from lightning_delta.targets import PARALLEL_FFN_PRESETS, is_linear_like, preset


def _linears(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if is_linear_like(m)]


def _reads_residual(module: nn.Module) -> bool:
    return "input_tensor" in inspect.signature(module.forward).parameters


@dataclass
class ParallelAdapterConfig(AdapterConfig):
    """Adapter hyper-parameters plus the scaling of the parallel branch.

    Args:
        scale: factor on the adapter's output (He et al. use 4).
    """

    method = "parallel_adapter"
    lr: float = field(default=0.001, kw_only=True)  # benchmarks.quality --sweep
    supported_types = "modules holding Linear layers whose input and output are hidden states (feed-forward blocks)"

    scale: float = 4.0

    def supports(self, module: nn.Module) -> bool:
        return bool(_linears(module)) and not isinstance(module, Delta)

    def preset(self, model: nn.Module) -> list[str]:
        return preset(PARALLEL_FFN_PRESETS, model, self.method, "feed-forward blocks")

    def build(self, module: nn.Module, seed: int, path: str = "") -> ParallelAdapter:
        return ParallelAdapter(self, module).seeded(seed)


class ParallelAdapter(Delta):
    """A scaled bottleneck fed with the block's input, added to the block's output."""

    def __init__(self, config: ParallelAdapterConfig, target: nn.Module) -> None:
        linears = _linears(target)
        super().__init__(config, linears[-1])
        self.residual = _reads_residual(target)
        width_in = out_features(linears[-1]) if self.residual else _in_features(linears[0])
        width_out = out_features(linears[-1])
        bottleneck = config.bottleneck_dim
        self.down_weight = nn.Parameter(torch.empty(bottleneck, width_in, **self.factory))
        self.down_bias = nn.Parameter(torch.zeros(bottleneck, **self.factory))
        self.up_weight = nn.Parameter(torch.zeros(width_out, bottleneck, **self.factory))
        self.up_bias = nn.Parameter(torch.zeros(width_out, **self.factory))
        self.activation, self.scale = config.activation, config.scale

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for p in (self.down_bias, self.up_weight, self.up_bias):
            p.zero_()
        kaiming_(self.down_weight, self.generator())

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """``scale * up(act(down(x)))`` in ``x``'s dtype; x ``(..., d_in)`` -> ``(..., d_out)``."""
        dtype = x.dtype
        hidden = ACTIVATIONS[self.activation](F.linear(x, self.down_weight.to(dtype), self.down_bias.to(dtype)))
        return self.scale * F.linear(hidden, self.up_weight.to(dtype), self.up_bias.to(dtype))

    def hook_into(self, target: nn.Module) -> None:
        if self.residual:
            target.register_forward_pre_hook(self.pre_hook, with_kwargs=True)
        else:
            super().hook_into(target)

    def pre_hook(self, target: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """BERT-style ``*Output``: add the branch to ``input_tensor`` (the feed-forward input)."""
        if self.idle:
            return args, kwargs
        if "input_tensor" in kwargs:
            residual = kwargs["input_tensor"]
            return args, {**kwargs, "input_tensor": residual + self.branch(residual)}
        residual = args[1]
        return (args[0], residual + self.branch(residual), *args[2:]), kwargs

    def forward(self, x: torch.Tensor, output: Any) -> Any:
        """``FFN(x) + branch(x)``."""
        return output + self.branch(x).to(output.dtype)


def _in_features(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0]
