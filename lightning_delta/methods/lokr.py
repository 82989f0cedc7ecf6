"""LoKr (Edalati et al., 2022, KronA; LyCORIS): a Kronecker-product update.

``W' = W + s * kron(w1, w2)`` with ``s = alpha / r``, PEFT's parameterisation: ``out = a * b`` and
``in = c * d`` are factorised (:func:`factorization`, near the square root, or with ``decompose_factor``),
``w1`` is ``(a, c)`` and ``w2`` is ``(b, d)``. ``w2`` is the low-rank ``w2_a @ w2_b`` (``(b, r)``,
``(r, d)``) when ``r < max(b, d) / 2``, otherwise a full matrix; ``w1`` likewise ``w1_a @ w1_b`` when
``decompose_both`` and ``r < max(a, c) / 2``. Init as PEFT: ``w1`` (or ``w1_a``) zero, the rest
Kaiming-uniform, so the update starts at zero. Supports ``nn.Linear`` and ``Conv1D``; presets as LoRA.
Trainable parameters per target: ``a * c`` (or ``r * (a + c)``) ``+ b * d`` (or ``r * (b + d)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_delta.core import DeltaConfig, WeightUpdateDelta
from lightning_delta.inits import kaiming_
from lightning_delta.peft_hooks import require_linear
from lightning_delta.targets import is_linear_like, linear_in_out


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m * n == dimension`` and ``m <= n`` (LyCORIS' and PEFT's rule).

    With ``factor > 0`` dividing ``dimension``: ``(factor, dimension // factor)``, else the pair
    closest to the square root with ``m`` at most ``factor`` (``-1``: no bound).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


@dataclass
class LokrConfig(DeltaConfig):
    """LoKr hyper-parameters.

    Args:
        r: rank of the low-rank Kronecker factors (> 0); large ranks keep ``w2`` a full matrix.
        alpha: scaling numerator; the update is scaled by ``alpha / r`` (PEFT's default: ``alpha = r = 8``).
        decompose_both: also make the first factor ``w1`` low rank (where ``r`` is small enough).
        decompose_factor: the factorisation's divider (``-1``: near the square root of each width).
    """

    method = "lokr"
    lr: float = field(default=0.03, kw_only=True)  # benchmarks.quality --sweep
    supported_types = "nn.Linear and transformers Conv1D"

    r: int = 8
    alpha: float = 8.0
    decompose_both: bool = False
    decompose_factor: int = -1

    def validate(self) -> None:
        self.check_range("r", self.r, isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0,
                         "a positive integer, e.g. r=8")
        self.check_range("alpha", self.alpha, isinstance(self.alpha, (int, float)) and self.alpha > 0,
                         "a positive number, e.g. alpha=8")
        self.check_range("decompose_factor", self.decompose_factor,
                         isinstance(self.decompose_factor, int) and not isinstance(self.decompose_factor, bool)
                         and (self.decompose_factor == -1 or self.decompose_factor > 0),
                         "-1 (near the square root) or a positive integer, e.g. decompose_factor=4")

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def peft_config(self, deltas: list, **common):
        import peft

        require_linear(self.method, deltas)
        return peft.LoKrConfig(r=self.r, alpha=self.alpha, decompose_both=self.decompose_both,
                               decompose_factor=self.decompose_factor, target_modules=[d.target_path for d in deltas],
                               **common)

    peft_type = "LOKR"

    @classmethod
    def from_peft(cls, settings, parts, name):
        cls.refuse_peft_options(settings, {"rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False,
                                           "rank_pattern": {}, "alpha_pattern": {}})
        return cls(r=int(settings["r"]), alpha=float(settings["alpha"]),
                   decompose_both=bool(settings.get("decompose_both")),
                   decompose_factor=int(settings.get("decompose_factor", -1)), targets=sorted(parts),
                   **({"name": name} if name else {}))

    def supports(self, module: nn.Module) -> bool:
        return is_linear_like(module)

    def build(self, module: nn.Module, seed: int, path: str = "") -> LoKr:
        return LoKr(self, module).seeded(seed)


class LoKr(WeightUpdateDelta):
    """Kronecker factors ``w1`` (or ``w1_a``, ``w1_b``) and ``w2`` (or ``w2_a``, ``w2_b``)."""


    def __init__(self, config: LokrConfig, target: nn.Module) -> None:
        super().__init__(config, target)
        in_features, out_features = linear_in_out(target)
        (a, b), (c, d) = (factorization(out_features, config.decompose_factor),
                          factorization(in_features, config.decompose_factor))
        r = config.r
        self.low_rank_w1 = config.decompose_both and r < max(a, c) / 2
        self.low_rank_w2 = r < max(b, d) / 2
        if self.low_rank_w1:
            self.w1_a = nn.Parameter(torch.zeros(a, r, **self.factory))
            self.w1_b = nn.Parameter(torch.empty(r, c, **self.factory))
        else:
            self.w1 = nn.Parameter(torch.zeros(a, c, **self.factory))
        if self.low_rank_w2:
            self.w2_a = nn.Parameter(torch.empty(b, r, **self.factory))
            self.w2_b = nn.Parameter(torch.empty(r, d, **self.factory))
        else:
            self.w2 = nn.Parameter(torch.empty(b, d, **self.factory))
        self.scale = config.scale

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``w1`` (or ``w1_a``) zero, the other factors Kaiming-uniform (as PEFT) from ``init_seed``."""
        generator = self.generator()
        if self.low_rank_w1:
            self.w1_a.zero_()
            kaiming_(self.w1_b, generator)
        else:
            self.w1.zero_()
        for p in (self.w2_a, self.w2_b) if self.low_rank_w2 else (self.w2,):
            kaiming_(p, generator)

    def update(self) -> torch.Tensor:
        """``s * kron(w1, w2)`` in ``(out, in)`` layout."""
        w1 = self.w1_a @ self.w1_b if self.low_rank_w1 else self.w1
        w2 = self.w2_a @ self.w2_b if self.low_rank_w2 else self.w2
        return torch.kron(w1, w2) * self.scale

    def load_peft_state(self, parts, shared):
        return {key[len("lokr_"):]: tensor for key, tensor in parts.items() if key.startswith("lokr_")}

    def peft_state(self, prefix: str) -> dict[str, torch.Tensor]:
        parts = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")  # the full or the factored form of each
        return {f"{prefix}.lokr_{p}": getattr(self, p).detach() for p in parts
                if isinstance(getattr(self, p, None), torch.Tensor)}

