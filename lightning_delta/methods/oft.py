"""OFT (Qiu et al., 2023): a learned block-diagonal orthogonal rotation of each target's input.

``y = base(x @ R)`` with ``R = diag(R_1, ..., R_k)``, ``k = in / block_size`` blocks, each the
Cayley transform ``(I - Q_i)(I + Q_i)^-1`` of a skew-symmetric ``Q_i`` built from its
``block_size * (block_size - 1) / 2`` free entries; equivalently ``W' = W R^T`` (PEFT 0.21's OFT
layer). As PEFT by default, the inverse is replaced by a truncated Neumann series
(``cayley_neumann=True``: ``R_i = I + 2 Q + 2 Q^2 + 2 Q^3 + Q^4`` for 5 terms, PEFT's series, which
expands ``(I + Q)(I - Q)^-1``), cheaper but only approximately orthogonal; ``cayley_neumann=False``
solves exactly (PEFT's exact branch). ``Q = 0`` at init: ``R = I``,
the identity. Supports ``nn.Linear`` and ``Conv1D`` whose input width ``block_size`` divides;
presets as LoRA. Trainable parameters per target: ``in / block_size * block_size * (block_size - 1) / 2``.
``merge()`` writes ``W R^T`` into the weight; ``unmerge()`` solves it back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_delta.core import Delta, DeltaConfig
from lightning_delta.errors import DeltaConfigError
from lightning_delta.peft_hooks import require_linear
from lightning_delta.targets import is_linear_like, linear_in_out


@dataclass
class OftConfig(DeltaConfig):
    """OFT hyper-parameters.

    Args:
        block_size: width of each orthogonal block (> 1); must divide every target's input width
            (PEFT's ``oft_block_size``, default 32).
        cayley_neumann: approximate the Cayley transform's inverse by a Neumann series, as PEFT does.
        neumann_terms: number of terms of that series (> 1; PEFT's ``num_cayley_neumann_terms``).
    """

    method = "oft"
    lr: float = field(default=0.003, kw_only=True)  # benchmarks.quality --sweep
    supported_types = "nn.Linear and transformers Conv1D"

    block_size: int = 32
    cayley_neumann: bool = True
    neumann_terms: int = 5

    def validate(self) -> None:
        self.check_range("block_size", self.block_size,
                         isinstance(self.block_size, int) and not isinstance(self.block_size, bool)
                         and self.block_size > 1, "an integer > 1 that divides the targets' input width, e.g. 32")
        self.check_range("neumann_terms", self.neumann_terms,
                         isinstance(self.neumann_terms, int) and not isinstance(self.neumann_terms, bool)
                         and self.neumann_terms > 1, "an integer > 1, e.g. neumann_terms=5")

    def peft_config(self, deltas: list, **common):
        import peft

        require_linear(self.method, deltas)
        return peft.OFTConfig(r=0, oft_block_size=self.block_size, use_cayley_neumann=self.cayley_neumann,
                              num_cayley_neumann_terms=self.neumann_terms,
                              target_modules=[d.target_path for d in deltas], **common)

    peft_type = "OFT"

    @classmethod
    def from_peft(cls, settings, parts, name):
        cls.refuse_peft_options(settings, {"coft": False, "block_share": False, "module_dropout": 0.0,
                                           "bias": "none"})
        return cls(block_size=int(settings["oft_block_size"]), cayley_neumann=bool(settings.get("use_cayley_neumann")),
                   neumann_terms=int(settings.get("num_cayley_neumann_terms", 5)), targets=sorted(parts),
                   **({"name": name} if name else {}))

    def supports(self, module: nn.Module) -> bool:
        return is_linear_like(module)

    def build(self, module: nn.Module, seed: int, path: str = "") -> OFT:
        in_features = linear_in_out(module)[0]
        if in_features % self.block_size:
            divisors = [b for b in range(2, min(in_features, 256) + 1) if in_features % b == 0]
            raise DeltaConfigError(
                f"oft: {path!r} has input width {in_features}, not divisible by block_size={self.block_size};"
                f" pick a block_size that divides it, e.g. one of {divisors[-6:]}")
        return OFT(self, module).seeded(seed)


class OFT(Delta):
    """``skew`` ``(blocks, block_size * (block_size - 1) / 2)``: the free entries of each ``Q_i``."""

    mergeable = True

    def __init__(self, config: OftConfig, target: nn.Module) -> None:
        super().__init__(config, target)
        in_features = linear_in_out(target)[0]
        self.block_size = config.block_size
        self.blocks = in_features // config.block_size
        self.transposed = not isinstance(target, nn.Linear)  # Conv1D stores its weight as (in, out)
        self.cayley_neumann, self.neumann_terms = config.cayley_neumann, config.neumann_terms
        n = config.block_size * (config.block_size - 1) // 2
        self.skew = nn.Parameter(torch.zeros(self.blocks, n, **self.factory))
        rows, cols = torch.triu_indices(config.block_size, config.block_size, 1, device=self.factory["device"])
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.merged_rotation: torch.Tensor | None = None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``Q = 0``: every block the identity."""
        self.skew.zero_()

    def rotations(self) -> torch.Tensor:
        """The blocks ``R_i``, ``(blocks, block_size, block_size)``, in the delta's dtype."""
        b = self.block_size
        upper = torch.zeros(self.blocks, b, b, device=self.skew.device, dtype=self.skew.dtype)
        upper[:, self.rows, self.cols] = self.skew
        q = upper - upper.transpose(-2, -1)
        eye = torch.eye(b, device=q.device, dtype=q.dtype).expand(self.blocks, b, b)
        if not self.cayley_neumann:
            return torch.linalg.solve(eye + q, eye - q, left=False)
        # PEFT's truncated series: I + 2Q + 2Q^2 (+ 2Q^3 ...) and a last, single power; it expands
        # (I + Q)(I - Q)^-1, the transpose of the exact branch's rotation for the same Q, as in PEFT
        r = eye + 2 * q
        if self.neumann_terms > 2:
            power = q @ q
            r = r + 2 * power
            for _ in range(3, self.neumann_terms - 1):
                power = power @ q
                r = r + 2 * power
            power = power @ q
            r = r + power
        return r

    def rotation(self) -> torch.Tensor:
        """The block-diagonal ``R``, ``(in, in)``."""
        return torch.block_diag(*self.rotations().unbind(0))

    def hook_into(self, target: nn.Module) -> None:
        target.register_forward_pre_hook(self.pre_hook, with_kwargs=True)

    def pre_hook(self, target: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Rotates the target's input ``(..., in)``: ``x @ R``, block by block, in the input's dtype."""
        if self.merged:
            return None
        x = args[0]
        blocks = x.reshape(*x.shape[:-1], self.blocks, self.block_size)
        rotated = torch.einsum("...rk,rkc->...rc", blocks, self.rotations().to(x.dtype)).reshape(x.shape)
        return (rotated, *args[1:]), kwargs

    def load_peft_state(self, parts, shared):
        return {"skew": parts["oft_R.weight"]}

    def peft_state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.oft_R.weight": self.skew.detach()}

    def forward(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:  # pragma: no cover - pre-hook only
        raise NotImplementedError("OFT rotates the target's input in pre_hook")

    @torch.no_grad()
    def merge(self, target: nn.Module) -> None:
        """``W <- W R^T`` (Conv1D, weight ``(in, out)``: ``W <- R W``)."""
        if self.merged:
            return
        rotation = self.rotation().to(torch.float64)
        weight = target.weight.to(torch.float64)
        merged = rotation @ weight if self.transposed else weight @ rotation.T
        target.weight.copy_(merged.to(target.weight.dtype))
        self.merged_rotation, self.merged = rotation, True

    @torch.no_grad()
    def unmerge(self, target: nn.Module) -> None:
        """Solves ``W R^T = W'`` (Conv1D: ``R W = W'``) with the rotation used by :meth:`merge`."""
        if not self.merged:
            return
        rotation = self.merged_rotation if self.merged_rotation is not None else self.rotation().to(torch.float64)
        weight = target.weight.to(torch.float64)
        if self.transposed:
            original = torch.linalg.solve(rotation, weight)
        else:
            original = torch.linalg.solve(rotation, weight.T).T
        target.weight.copy_(original.to(target.weight.dtype))
        self.merged_rotation, self.merged = None, False
