"""LoRA (Hu et al., 2021): a trainable low-rank update ``W + s * B @ A`` beside a frozen weight.

``y = base(x) + s * B(A(dropout(x)))`` with ``A`` of shape ``(r, in)``, ``B`` of shape
``(out, r)``, ``s = alpha / r`` (``alpha / sqrt(r)`` with ``rslora=True``) and ``B = 0`` at
init, so the attached model computes exactly what the backbone did. Supported targets:
``nn.Linear``, transformers' ``Conv1D`` (GPT-2, weight stored ``(in, out)``), ``nn.Embedding``
and ``nn.Conv2d`` (``A`` is a conv with the target's kernel, ``B`` a 1x1 conv).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightning_delta.core import Delta, DeltaConfig, kaiming_
from lightning_delta.targets import is_linear_like


@dataclass
class LoraConfig(DeltaConfig):
    """LoRA hyper-parameters.

    Args:
        r: rank of the update (> 0).
        alpha: scaling numerator; the update is scaled by ``alpha / r``.
        dropout: dropout on the LoRA branch's input, in ``[0, 1)``.
        rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA) instead.
    """

    method = "lora"
    supported_types = "nn.Linear, transformers Conv1D, nn.Embedding and nn.Conv2d (groups=1)"

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False

    def validate(self) -> None:
        self.check_range("r", self.r, isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0,
                         "a positive integer, e.g. r=8")
        self.check_range("alpha", self.alpha, isinstance(self.alpha, (int, float)) and self.alpha > 0,
                         "a positive number, e.g. alpha=16")
        self.check_range("dropout", self.dropout, isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1,
                         "in [0, 1), e.g. dropout=0.05")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, nn.Conv2d):
            return module.groups == 1 and module.padding_mode == "zeros"
        return is_linear_like(module) or isinstance(module, nn.Embedding)

    def build(self, module: nn.Module, seed: int, path: str = "") -> LoRA:
        if isinstance(module, nn.Embedding):
            delta: LoRA = LoRAEmbedding(self, module)
        elif isinstance(module, nn.Conv2d):
            delta = LoRAConv2d(self, module)
        else:
            delta = LoRALinear(self, module)
        return delta.seeded(seed)


class LoRA(Delta):
    """Shared parts of the LoRA variants: the two factors, scaling and merge."""

    mergeable = True
    row_selectable = True

    def __init__(self, config: LoraConfig, target: nn.Module, a_shape: tuple[int, ...], b_shape: tuple[int, ...]):
        super().__init__(config, target)
        self.A = nn.Parameter(torch.empty(a_shape, **self.factory))
        self.B = nn.Parameter(torch.zeros(b_shape, **self.factory))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scale = config.scale

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``A`` Kaiming-uniform (as ``nn.Linear`` and PEFT) drawn from ``init_seed``, ``B`` zero.

        The delta starts as the identity, with the same values on every rank; Lightning calls this
        when it materialises a model built on the meta device.
        """
        self.B.zero_()
        kaiming_(self.A, self.generator())

    def add(self, output: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """``output + update``; in a mixed batch only on the rows that select this delta."""
        gate = self.row_gate(output)
        return output + (update if gate is None else update * gate)

    def delta_weight(self, target: nn.Module) -> torch.Tensor:
        """The update in the layout of ``target.weight``: ``s * B @ A``."""
        return (self.B.flatten(1) @ self.A.flatten(1)) * self.scale

    @torch.no_grad()
    def merge(self, target: nn.Module) -> None:
        if not self.merged:
            target.weight += self.delta_weight(target).to(target.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self, target: nn.Module) -> None:
        if self.merged:
            target.weight -= self.delta_weight(target).to(target.weight.dtype)
            self.merged = False


class LoRALinear(LoRA):
    """LoRA on ``nn.Linear`` or ``Conv1D``."""

    def __init__(self, config: LoraConfig, target: nn.Module):
        transposed = not isinstance(target, nn.Linear)  # Conv1D stores its weight as (in, out)
        out_features, in_features = target.weight.shape[::-1] if transposed else target.weight.shape
        super().__init__(config, target, (config.r, in_features), (out_features, config.r))
        self.transposed = transposed

    def forward(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """``output + s * dropout(x) @ A.T @ B.T``; x ``(..., in)``, output ``(..., out)``.

        Computed in the activations' dtype: under a bf16 backbone the small factors are cast
        down (their gradients arrive in fp32), not the large activations up.
        """
        x = self.dropout(x)
        # the scale goes into the small B, not onto the (batch, seq, out) product
        update = F.linear(F.linear(x, self.A.to(x.dtype)), (self.B * self.scale).to(x.dtype))
        return self.add(output, update.to(output.dtype))

    def delta_weight(self, target: nn.Module) -> torch.Tensor:
        update = super().delta_weight(target)
        return update.T if self.transposed else update


class LoRAEmbedding(LoRA):
    """LoRA on ``nn.Embedding``: ``A`` is looked up like a table, then projected by ``B``."""

    def __init__(self, config: LoraConfig, target: nn.Embedding):
        super().__init__(config, target, (config.r, target.num_embeddings), (target.embedding_dim, config.r))
        self.padding_idx = target.padding_idx

    def forward(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """``output + s * A.T[x] @ B.T``; x ``(...)`` token ids, output ``(..., dim)``."""
        looked_up = F.embedding(x, self.A.T.to(output.dtype), padding_idx=self.padding_idx)
        return self.add(output, F.linear(looked_up, (self.B * self.scale).to(output.dtype)))

    def delta_weight(self, target: nn.Module) -> torch.Tensor:
        return super().delta_weight(target).T


class LoRAConv2d(LoRA):
    """LoRA on ``nn.Conv2d``: ``A`` convolves like the target, ``B`` mixes channels (1x1)."""

    def __init__(self, config: LoraConfig, target: nn.Conv2d):
        a_shape = (config.r, target.in_channels, *target.kernel_size)
        super().__init__(config, target, a_shape, (target.out_channels, config.r, 1, 1))
        self.stride, self.padding, self.dilation = target.stride, target.padding, target.dilation

    def forward(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """x ``(N, in, H, W)``, output ``(N, out, H', W')``."""
        x = self.dropout(x)
        hidden = F.conv2d(x, self.A.to(x.dtype), stride=self.stride, padding=self.padding, dilation=self.dilation)
        return self.add(output, F.conv2d(hidden, (self.B * self.scale).to(x.dtype)).to(output.dtype))

    def delta_weight(self, target: nn.Module) -> torch.Tensor:
        return super().delta_weight(target).view_as(target.weight)
