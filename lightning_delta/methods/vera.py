"""VeRA (Kopiczko et al., 2024): one pair of frozen random matrices shared by every target, and two
trainable scaling vectors per target.

``y = base(x) + lambda_b * (B[:out] @ (lambda_d * (A[:, :in] @ dropout(x))))`` with ``A`` of shape
``(r, max_in)`` and ``B`` of shape ``(max_out, r)``, the largest input and output widths among the
targets of one attach, as in PEFT. ``A`` and ``B`` are frozen buffers drawn Kaiming-uniform (PEFT's
draw) from ``projection_seed``, or from the run's seed and the first target's path when that is
``None``; every delta of the attach holds the same two tensors. ``lambda_d`` starts at
``d_initial`` and ``lambda_b`` at zero: the identity at init. Supports ``nn.Linear`` and ``Conv1D``;
presets as LoRA. Trainable parameters per target: ``r + out``.

Checkpoints: with ``save_projection=True`` (PEFT's default) ``A`` and ``B`` are stored once, under
the first target's delta (``<first target>.vera.A``); the other deltas hold them as non-persistent
buffers. With ``save_projection=False`` they are left out and redrawn from ``projection_seed``,
which must then be given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_delta.core import Delta, DeltaConfig, WeightUpdateDelta
from lightning_delta.targets import is_linear_like, linear_in_out


def projection(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A ``(rows, cols)`` matrix drawn as PEFT draws VeRA's projections: uniform, bound ``sqrt(6 / cols)``."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(cols)
    return torch.empty(rows, cols).uniform_(-bound, bound, generator=generator)


@dataclass
class VeraConfig(DeltaConfig):
    """VeRA hyper-parameters.

    Args:
        r: rank of the shared random projections (> 0; VeRA uses ranks far above LoRA's, PEFT's default is 256).
        dropout: dropout on the VeRA branch's input, in ``[0, 1)``.
        d_initial: initial value of every ``lambda_d`` entry (> 0).
        projection_seed: seed of the shared matrices ``A`` and ``B`` (PEFT's ``projection_prng_key``);
            ``None`` derives them from the run's seed.
        save_projection: store ``A`` and ``B`` in the delta's state (``False`` needs ``projection_seed``).
    """

    method = "vera"
    lr: float = field(default=0.03, kw_only=True)  # benchmarks.quality --sweep
    supported_types = "nn.Linear and transformers Conv1D"

    r: int = 256
    dropout: float = 0.0
    d_initial: float = 0.1
    projection_seed: int | None = None
    save_projection: bool = True

    def validate(self) -> None:
        self.check_range("r", self.r, isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0,
                         "a positive integer, e.g. r=256")
        self.check_range("dropout", self.dropout, isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1,
                         "in [0, 1), e.g. dropout=0.05")
        self.check_range("d_initial", self.d_initial, isinstance(self.d_initial, (int, float)) and self.d_initial > 0,
                         "a positive number, e.g. d_initial=0.1")
        self.check_range("projection_seed", self.projection_seed,
                         self.projection_seed is None or (isinstance(self.projection_seed, int)
                                                          and not isinstance(self.projection_seed, bool)
                                                          and self.projection_seed >= 0),
                         "None or a non-negative integer, e.g. projection_seed=0")
        self.check_range("save_projection", self.save_projection,
                         self.save_projection or self.projection_seed is not None,
                         "True unless projection_seed is set (the matrices are then redrawn from it on load),"
                         " e.g. save_projection=False, projection_seed=0")

    def peft_config(self, deltas: list, **common):
        import peft

        return peft.VeraConfig(r=self.r, target_modules=[d.target_path for d in deltas], vera_dropout=self.dropout,
                               d_initial=self.d_initial, save_projection=True,
                               projection_prng_key=self.projection_seed or 0,
                               fan_in_fan_out=any(d.module.transposed for d in deltas), **common)

    peft_type = "VERA"

    @classmethod
    def from_peft(cls, settings, parts, name):
        cls.refuse_peft_options(settings, {"bias": "none"})
        return cls(r=int(settings["r"]), dropout=float(settings.get("vera_dropout") or 0.0),
                   d_initial=float(settings.get("d_initial", 0.1)),
                   projection_seed=int(settings["projection_prng_key"]),
                   save_projection=bool(settings.get("save_projection", True)), targets=sorted(parts),
                   **({"name": name} if name else {}))

    def supports(self, module: nn.Module) -> bool:
        return is_linear_like(module)

    def build(self, module: nn.Module, seed: int, path: str = "") -> VeRA:
        return VeRA(self, module).seeded(seed)

    def tie(self, deltas: list[Delta]) -> None:
        """Gives every delta of this attach the same ``A`` (``r x max_in``) and ``B`` (``max_out x r``)."""
        if not deltas:
            return
        first = deltas[0]
        max_in = max(d.in_features for d in deltas)
        max_out = max(d.out_features for d in deltas)
        seed = self.projection_seed if self.projection_seed is not None else first.init_seed
        shared: dict[str, Any] = {"seed": seed}
        factory = first.factory
        shared["A"] = torch.empty(self.r, max_in, **factory)
        shared["B"] = torch.empty(max_out, self.r, **factory)
        for i, delta in enumerate(deltas):
            persistent = self.save_projection and i == 0
            delta.register_buffer("A", shared["A"], persistent=persistent)
            delta.register_buffer("B", shared["B"], persistent=persistent)
            delta.shared = shared
        first.reset_projections()


class VeRA(WeightUpdateDelta):
    """Trainable ``lambda_d`` (``r``) and ``lambda_b`` (``out``) around the shared frozen ``A`` and ``B``."""


    def __init__(self, config: VeraConfig, target: nn.Module) -> None:
        super().__init__(config, target)
        self.in_features, self.out_features = linear_in_out(target)
        self.lambda_d = nn.Parameter(torch.empty(config.r, **self.factory))
        self.lambda_b = nn.Parameter(torch.zeros(self.out_features, **self.factory))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.d_initial = config.d_initial
        #: the attach's shared tensors and their seed (set by ``VeraConfig.tie``)
        self.shared: dict[str, Any] = {}

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``lambda_d`` at ``d_initial``, ``lambda_b`` zero; the shared matrices redrawn from their seed."""
        self.lambda_d.fill_(self.d_initial)
        self.lambda_b.zero_()
        self.reset_projections()

    @torch.no_grad()
    def reset_projections(self) -> None:
        """Draws ``A`` then ``B`` from the shared seed (every delta of the attach writes the same values)."""
        if "A" not in self._buffers or self.A.device.type == "meta":
            return
        generator = torch.Generator().manual_seed(self.shared["seed"])
        self.A.copy_(projection(*self.A.shape, generator))
        self.B.copy_(projection(*self.B.shape, generator))

    def _apply(self, fn: Any, recurse: bool = True) -> VeRA:
        """Moving or casting the model keeps ``A`` and ``B`` one tensor each, shared by the attach's deltas."""
        super()._apply(fn, recurse)
        for key in ("A", "B"):
            mine, theirs = self._buffers.get(key), self.shared.get(key)
            if mine is None:
                continue
            if (theirs is not None and theirs is not mine and theirs.device == mine.device
                    and theirs.dtype == mine.dtype):
                self._buffers[key] = theirs  # an earlier delta already converted the shared tensor
            else:
                self.shared[key] = mine
        return self

    def _factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``diag(lambda_d) A[:, :in]`` and ``diag(lambda_b) B[:out]`` in ``dtype``."""
        device = self.lambda_d.device  # the shared pair lives beside the first target
        a = self.lambda_d[:, None] * self.A[:, :self.in_features].to(device)
        b = self.lambda_b[:, None] * self.B[:self.out_features].to(device)
        return a.to(dtype), b.to(dtype)

    def load_peft_state(self, parts, shared):
        state = {"lambda_d": parts["vera_lambda_d"], "lambda_b": parts["vera_lambda_b"]}
        if "A" not in self._non_persistent_buffers_set and "base_model.vera_A" in shared:  # the stored copy
            state.update(A=shared["base_model.vera_A"], B=shared["base_model.vera_B"])
        return state

    def peft_state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.vera_lambda_d": self.lambda_d.detach(), f"{prefix}.vera_lambda_b": self.lambda_b.detach(),
                "base_model.vera_A": self.A.detach(), "base_model.vera_B": self.B.detach()}  # shared by all targets

    def forward(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """``output + lambda_b * B (lambda_d * A dropout(x))``; x ``(..., in)``, output ``(..., out)``."""
        a, b = self._factors(x.dtype)
        return output + F.linear(F.linear(self.dropout(x), a), b).to(output.dtype)

    def update(self) -> torch.Tensor:
        """``diag(lambda_b) B diag(lambda_d) A`` in ``(out, in)`` layout."""
        a, b = self._factors(self.storage_dtype)
        return b @ a

