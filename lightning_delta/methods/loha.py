"""LoHa (Hyeon-Woo et al., 2022, FedPara; LyCORIS): a Hadamard product of two low-rank products.

``W' = W + s * (w1_a @ w1_b) * (w2_a @ w2_b)`` (element-wise product) with ``w*_a`` of shape
``(out, r)``, ``w*_b`` of shape ``(r, in)`` and ``s = alpha / r``, PEFT's parameterisation and
initialisation: ``w1_a``, ``w1_b``, ``w2_a`` Kaiming-uniform, ``w2_b`` zero, so the update starts
at zero (the identity at init). The rank of the update reaches ``r ** 2`` for ``2 * r * (in + out)``
parameters per target. Supports ``nn.Linear`` and ``Conv1D``; presets as LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_delta.core import DeltaConfig, WeightUpdateDelta
from lightning_delta.inits import kaiming_
from lightning_delta.peft_hooks import require_linear
from lightning_delta.targets import is_linear_like, linear_in_out


@dataclass
class LohaConfig(DeltaConfig):
    """LoHa hyper-parameters.

    Args:
        r: rank of each of the two factors (> 0).
        alpha: scaling numerator; the update is scaled by ``alpha / r`` (PEFT's default: ``alpha = r = 8``).
    """

    method = "loha"
    lr: float = field(default=0.01, kw_only=True)  # benchmarks.quality --sweep
    supported_types = "nn.Linear and transformers Conv1D"

    r: int = 8
    alpha: float = 8.0

    def validate(self) -> None:
        self.check_range("r", self.r, isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0,
                         "a positive integer, e.g. r=8")
        self.check_range("alpha", self.alpha, isinstance(self.alpha, (int, float)) and self.alpha > 0,
                         "a positive number, e.g. alpha=8")

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def peft_config(self, deltas: list, **common):
        import peft

        require_linear(self.method, deltas)
        return peft.LoHaConfig(r=self.r, alpha=self.alpha, target_modules=[d.target_path for d in deltas], **common)

    peft_type = "LOHA"

    @classmethod
    def from_peft(cls, settings, parts, name):
        cls.refuse_peft_options(settings, {"rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False,
                                           "rank_pattern": {}, "alpha_pattern": {}})
        return cls(r=int(settings["r"]), alpha=float(settings["alpha"]), targets=sorted(parts),
                   **({"name": name} if name else {}))

    def supports(self, module: nn.Module) -> bool:
        return is_linear_like(module)

    def build(self, module: nn.Module, seed: int, path: str = "") -> LoHa:
        return LoHa(self, module).seeded(seed)


class LoHa(WeightUpdateDelta):
    """Four factors ``w1_a``, ``w1_b``, ``w2_a``, ``w2_b``; the update is their Hadamard-combined product."""


    def __init__(self, config: LohaConfig, target: nn.Module) -> None:
        super().__init__(config, target)
        in_features, out_features = linear_in_out(target)
        self.w1_a = nn.Parameter(torch.empty(out_features, config.r, **self.factory))
        self.w1_b = nn.Parameter(torch.empty(config.r, in_features, **self.factory))
        self.w2_a = nn.Parameter(torch.empty(out_features, config.r, **self.factory))
        self.w2_b = nn.Parameter(torch.zeros(config.r, in_features, **self.factory))
        self.scale = config.scale

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``w1_a``, ``w1_b``, ``w2_a`` Kaiming-uniform (as PEFT) from ``init_seed``, ``w2_b`` zero."""
        generator = self.generator()
        for p in (self.w1_a, self.w1_b, self.w2_a):
            kaiming_(p, generator)
        self.w2_b.zero_()

    def update(self) -> torch.Tensor:
        """``s * (w1_a @ w1_b) * (w2_a @ w2_b)`` in ``(out, in)`` layout."""
        return (self.w1_a @ self.w1_b) * (self.w2_a @ self.w2_b) * self.scale

    def load_peft_state(self, parts, shared):
        return {part: parts[f"hada_{part}"] for part in ("w1_a", "w1_b", "w2_a", "w2_b")}

    def peft_state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.hada_{part}": getattr(self, part).detach() for part in ("w1_a", "w1_b", "w2_a", "w2_b")}

