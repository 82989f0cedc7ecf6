"""DoRA (Liu et al., 2024): LoRA's direction update plus a learned per-output magnitude.

``W' = m * (W + s B A) / ||W + s B A||`` with the norm taken per output row and, as in the paper
and PEFT, detached from the graph. ``m`` starts at ``||W||``, ``B`` at zero: the identity at init.
Supports ``nn.Linear`` and ``Conv1D``; presets as LoRA. Parameters per target:
``r * (in + out) + out``. ``merge()`` writes ``W'`` into the weight; ``unmerge()`` restores ``W``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_delta.inits import as_shape
from lightning_delta.methods.lora import LoraConfig, LoRALinear
from lightning_delta.targets import is_linear_like
from lightning_delta.tensors import is_quantized


@dataclass
class DoraConfig(LoraConfig):
    """DoRA takes LoRA's hyper-parameters (r, alpha, dropout, rslora; init 'default' or 'gaussian')."""

    method = "dora"
    lr: float = field(default=0.003, kw_only=True)  # benchmarks.quality --sweep (3 seeds)
    supported_types = "nn.Linear and transformers Conv1D"

    @classmethod
    def reads_peft(cls, settings):
        return cls.peft_type == str(settings.get("peft_type")) and bool(settings.get("use_dora"))

    def validate(self) -> None:
        super().validate()
        self.check_range("init", self.init, self.init in ("default", "gaussian"),
                         "'default' or 'gaussian' (DoRA's magnitude is taken from the unchanged weight)")

    def supports(self, module: nn.Module) -> bool:
        return is_linear_like(module)

    def build(self, module: nn.Module, seed: int, path: str = "") -> DoRA:
        if not self.supports(module):  # fused expert parameters: LoRA's refusal names them
            return super().build(module, seed, path)
        delta = DoRA(self, module).seeded(seed)
        with torch.no_grad():
            delta.magnitude.copy_(delta.base_weight(module).float().norm(dim=1).to(delta.magnitude.dtype))
        return delta


class DoRA(LoRALinear):
    """LoRA factors ``A``, ``B`` and a magnitude vector ``m`` of ``out`` entries."""

    row_selectable = False  # its magnitude rescales the whole output: no per-row selection (yet)

    def __init__(self, config: DoraConfig, target: nn.Module) -> None:
        super().__init__(config, target)
        self.magnitude = nn.Parameter(torch.ones(self.B.shape[0], **self.factory))
        self.merged_norm: torch.Tensor | None = None

    def load_peft_state(self, parts, shared):
        magnitude = parts.get("lora_magnitude_vector", parts.get("lora_magnitude_vector.weight"))
        return {**super().load_peft_state(parts, shared),
                "magnitude": as_shape(magnitude, self.magnitude.shape, "lora_magnitude_vector")}

    def peft_state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {**super().peft_state(prefix), f"{prefix}.lora_magnitude_vector": self.magnitude.detach()}

    def base_weight(self, target: nn.Module) -> torch.Tensor:
        """The target's weight in ``(out, in)`` layout (dequantized if it is 4-bit NF4: QDoRA)."""
        weight = target.weight
        if is_quantized(weight):
            weight = weight.get_original_weight()
        return weight.T if self.transposed else weight

    def _column_norm(self, target: nn.Module) -> torch.Tensor:
        lora = (self.B @ self.A) * self.scale
        return (self.base_weight(target).to(lora.dtype) + lora).norm(dim=1).detach()

    def forward_hook(self, target: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """``output + (g - 1) * W x + g * s * B A dropout(x)`` with ``g = m / ||W + s B A||``."""
        if self.idle:
            return output
        x = args[0] if args else next(iter(kwargs.values()))
        bias = getattr(target, "bias", None)
        base = output - bias if bias is not None else output  # W x
        gain = (self.magnitude / self._column_norm(target)).to(output.dtype)
        lora = F.linear(F.linear(self.dropout(x), self.A.to(x.dtype)), self.B.to(x.dtype)) * self.scale
        return output + (gain - 1) * base + gain * lora.to(output.dtype)

    def additive_update(self) -> None:
        """None: the magnitude rescales the whole weight, the update is no sum."""
        return None

    def delta_weight(self, target: nn.Module) -> torch.Tensor:
        raise NotImplementedError("DoRA merges through merge(), not an additive delta weight")

    @torch.no_grad()
    def merge(self, target: nn.Module) -> None:
        if self.merged:
            return
        norm = self._column_norm(target)
        lora = (self.B @ self.A) * self.scale
        merged = (self.magnitude / norm)[:, None] * (self.base_weight(target).float() + lora)
        target.weight.copy_((merged.T if self.transposed else merged).to(target.weight.dtype))
        self.merged_norm, self.merged = norm, True

    @torch.no_grad()
    def unmerge(self, target: nn.Module) -> None:
        if not self.merged:
            return
        lora = (self.B @ self.A) * self.scale
        original = self.base_weight(target).float() / (self.magnitude / self.merged_norm)[:, None] - lora
        target.weight.copy_((original.T if self.transposed else original).to(target.weight.dtype))
        self.merged_norm, self.merged = None, False
