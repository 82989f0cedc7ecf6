"""IA3 (Liu et al., 2022): learned vectors that rescale activations, initialised to ones.

Keys and values are rescaled at the output of their projections; the feed-forward
intermediate activation is rescaled at the input of the feed-forward down projection (the
``feedforward`` targets), as in PEFT. One vector per target: ``out`` entries for outputs, ``in``
for inputs. ``merge()`` folds the vector into the target's weight (and bias, for outputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_delta.core import Delta, DeltaConfig
from lightning_delta.inits import as_shape
from lightning_delta.targets import (
    FFN_OUTPUT_PRESETS,
    KEY_VALUE_PRESETS,
    is_linear_like,
    layouts,
    matches,
    normalize_patterns,
    preset,
)

#: Feed-forward down projections of the preset architectures (unambiguous across them).
FEEDFORWARD_DEFAULT = tuple(dict.fromkeys(p for entry in FFN_OUTPUT_PRESETS.values() for layout in layouts(entry)
                                          for p in layout))


def _in_out(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear (weight ``(out, in)``) or Conv1D (weight ``(in, out)``)."""
    rows, cols = module.weight.shape
    return (cols, rows) if isinstance(module, nn.Linear) else (rows, cols)


@dataclass
class IA3Config(DeltaConfig):
    """IA3 hyper-parameters.

    Args:
        feedforward: patterns of targets whose *input* is rescaled (the feed-forward down
            projections); every other target's output is rescaled. ``None``: the feed-forward
            down projections of every preset architecture (``FEEDFORWARD_DEFAULT``).
    """

    method = "ia3"
    decays = False  # offsets, scales or embeddings: no weight decay
    lr: float = field(default=0.03, kw_only=True)  # benchmarks.quality --sweep
    supported_types = "nn.Linear and transformers Conv1D"

    feedforward: list[str] | None = field(default=None)

    def validate(self) -> None:
        if self.feedforward is not None:
            self.feedforward = list(normalize_patterns(self.feedforward))

    def peft_config(self, deltas: list, **common):
        import peft

        return peft.IA3Config(target_modules=[d.target_path for d in deltas],
                              feedforward_modules=[d.target_path for d in deltas if d.module.on_input], **common)

    peft_type = "IA3"

    @classmethod
    def from_peft(cls, settings, parts, name):
        # PEFT stores a feed-forward (input) scale as (1, in), an output scale as (out, 1)
        feedforward = sorted(p for p, t in parts.items() if t["ia3_l"].dim() == 2 and t["ia3_l"].shape[0] == 1)
        return cls(targets=sorted(parts), feedforward=feedforward, **({"name": name} if name else {}))

    def supports(self, module: nn.Module) -> bool:
        return is_linear_like(module)

    def preset(self, model: nn.Module) -> list[str]:
        return (preset(KEY_VALUE_PRESETS, model, self.method, "keys and values")
                + preset(FFN_OUTPUT_PRESETS, model, self.method, "feed-forward down projections"))

    def is_feedforward(self, target_path: str) -> bool:
        """Whether the target at ``target_path`` gets its input (not its output) rescaled."""
        patterns = self.feedforward if self.feedforward is not None else FEEDFORWARD_DEFAULT
        return any(matches(target_path, p) for p in patterns)

    def build(self, module: nn.Module, seed: int, path: str = "") -> IA3:
        return IA3(self, module, on_input=self.is_feedforward(path))


class IA3(Delta):
    """A learned rescaling of a target's output (or input, for feed-forward targets)."""

    mergeable = True
    row_selectable = True

    def __init__(self, config: IA3Config, target: nn.Module, on_input: bool) -> None:
        super().__init__(config, target)
        in_features, out_features = _in_out(target)
        self.on_input = on_input
        self.scale = nn.Parameter(torch.ones(in_features if on_input else out_features, **self.factory))

    def hook_into(self, target: nn.Module) -> None:
        if self.on_input:
            target.register_forward_pre_hook(self.pre_hook, with_kwargs=True)
        else:
            super().hook_into(target)

    def pre_hook(self, target: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Rescales the target's input ``(..., in)``."""
        if self.idle:
            return None
        x = args[0]
        return (x * self._factor(x), *args[1:]), kwargs

    def load_peft_state(self, parts, shared):
        return {"scale": as_shape(parts.get("ia3_l"), self.scale.shape, "ia3_l")}

    def peft_state(self, prefix: str) -> dict[str, torch.Tensor]:
        scale = self.scale.detach()
        return {f"{prefix}.ia3_l": scale[None, :] if self.on_input else scale[:, None]}

    def forward(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Rescales the target's output ``(..., out)``."""
        return output * self._factor(output)

    def _factor(self, t: torch.Tensor) -> torch.Tensor:
        """The scale in ``t``'s dtype; in a mixed batch, 1 on the rows that do not select this delta."""
        scale = self.scale.to(t.dtype)
        gate = self.row_gate(t)
        return scale if gate is None else torch.where(gate, scale, torch.ones_like(scale))

    def _fold(self, target: nn.Module, factor: torch.Tensor) -> None:
        weight = target.weight
        linear = isinstance(target, nn.Linear)
        if self.on_input:  # columns of W (rows of a Conv1D weight)
            weight *= (factor[None, :] if linear else factor[:, None]).to(weight.dtype)
        else:
            weight *= (factor[:, None] if linear else factor[None, :]).to(weight.dtype)
            if target.bias is not None:
                target.bias *= factor.to(target.bias.dtype)

    @torch.no_grad()
    def merge(self, target: nn.Module) -> None:
        if not self.merged:
            self._fold(target, self.scale)
            self.merged = True

    @torch.no_grad()
    def unmerge(self, target: nn.Module) -> None:
        if self.merged:
            self._fold(target, 1.0 / self.scale)
            self.merged = False
