"""LoRA's delta modules: the factors ``A``, ``B`` beside a Linear / Conv1D, Embedding or Conv2d target.

The hyper-parameters and the choice among these live in :class:`~lightning_delta.methods.lora.LoraConfig`;
see :mod:`~lightning_delta.methods.lora` for the method.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_delta.core import Delta, MergesDeltaWeight
from lightning_delta.errors import UnsupportedModuleError
from lightning_delta.inits import as_shape, fill_, kaiming_
from lightning_delta.methods.fused_lora import lora_branch
from lightning_delta.tensors import is_quantized

#: ``init`` values that replace the frozen weight by a residual at attach.
RESIDUAL_INITS = ("pissa", "olora")


def draw_a_(a: torch.Tensor, config: Any, generator: torch.Generator) -> None:
    """Fills a LoRA ``A`` factor: Kaiming-uniform (as ``nn.Linear`` and PEFT), or ``N(0, (1/r)^2)`` with
    ``init="gaussian"``, drawn from ``generator``."""
    if config.init == "gaussian":
        fill_(a, lambda t: t.normal_(0.0, 1 / config.r, generator=generator))
    else:
        kaiming_(a, generator)


@torch.no_grad()
def add_in_float32_(weight: torch.Tensor, update: torch.Tensor) -> None:
    """``weight += update``, summed in float32 and written back in the weight's dtype (one rounding)."""
    weight.copy_((weight.float() + update.to(weight.device)).to(weight.dtype))


class LoRA(MergesDeltaWeight, Delta):
    """Shared parts of the LoRA variants: the two factors, scaling and merge."""

    mergeable = True
    row_selectable = True

    def __init__(self, config: Any, target: nn.Module, a_shape: tuple[int, ...], b_shape: tuple[int, ...]):
        super().__init__(config, target)
        self.A = nn.Parameter(torch.empty(a_shape, **self.factory))
        self.B = nn.Parameter(torch.zeros(b_shape, **self.factory))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scale = config.scale

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``A`` Kaiming-uniform (as ``nn.Linear`` and PEFT) or Gaussian drawn from ``init_seed``, ``B`` zero.

        The delta starts as the identity, with the same values on every rank; Lightning calls this
        when it materialises a model built on the meta device. PiSSA / OLoRA factors come from the
        target's weight instead (:meth:`LoRALinear.init_from_weight`).
        """
        self.B.zero_()
        draw_a_(self.A, self.config, self.generator())

    def start_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(A0, B0)`` where the delta's update is relative to a non-zero start (PiSSA, OLoRA, LoRA-GA)."""
        return None

    def peft_state(self, prefix: str) -> dict[str, torch.Tensor]:
        a, b = self.A.detach(), self.B.detach()
        start = self.start_factors()
        if start is not None:
            # trained beside W - s B0 A0 (a residual weight, or LoRA-GA's subtracted start), loaded onto W:
            # W - s B0 A0 + s B A = W + s [B, -B0] [A; A0], as PEFT's own conversion of PiSSA / OLoRA adapters
            a, b = torch.cat([a, start[0].to(a.dtype)], dim=0), torch.cat([b, -start[1].to(b.dtype)], dim=1)
        names = ("lora_embedding_A", "lora_embedding_B") if isinstance(self, LoRAEmbedding) else \
            ("lora_A.weight", "lora_B.weight")
        return {f"{prefix}.{names[0]}": a, f"{prefix}.{names[1]}": b}

    def load_peft_state(self, parts, shared):
        a, b = ("lora_embedding_A", "lora_embedding_B") if isinstance(self, LoRAEmbedding) else \
            ("lora_A.weight", "lora_B.weight")
        return {"A": as_shape(parts.get(a), self.A.shape, a), "B": as_shape(parts.get(b), self.B.shape, b)}

    def add(self, output: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """``output + update``; in a mixed batch only on the rows that select this delta."""
        gate = self.row_gate(output)
        if gate is not None and type(update).__name__ == "DTensor":  # a tensor-parallel target: the mask on every rank
            from torch.distributed.tensor import DTensor, Replicate

            mesh = update.device_mesh
            gate = DTensor.from_local(gate, mesh, [Replicate()] * mesh.ndim, run_check=False)
        return output + (update if gate is None else update * gate)

    def additive_update(self) -> torch.Tensor:
        """``s * B @ A`` in the factors' layout (``(out, in)`` on a Linear, ``(out, in * kernel)`` on a conv)."""
        return (self.B.flatten(1) @ self.A.flatten(1)) * self.scale

    def delta_weight(self, target: nn.Module) -> torch.Tensor:
        """The update in the layout of ``target.weight``: ``s * B @ A``."""
        return self.additive_update()



class LoRALinear(LoRA):
    """LoRA on ``nn.Linear`` or ``Conv1D``."""

    def __init__(self, config: Any, target: nn.Module):
        transposed = not isinstance(target, nn.Linear)  # Conv1D stores its weight as (in, out)
        out_features, in_features = target.weight.shape[::-1] if transposed else target.weight.shape
        super().__init__(config, target, (config.r, in_features), (out_features, config.r))
        self.transposed = transposed
        self.residual = config.init in RESIDUAL_INITS
        if self.residual:  # the initial factors, subtracted from the weight at attach (not saved)
            self.register_buffer("A0", torch.zeros_like(self.A), persistent=False)
            self.register_buffer("B0", torch.zeros_like(self.B), persistent=False)

    def tensor_parallel_layout(self, style):
        """Column-parallel target (input replicated, output sharded over features): ``A`` replicated, ``B``
        ``Shard(0)``; row-parallel (input sharded, output a partial sum): ``A`` ``Shard(1)``, ``B`` replicated."""
        if self.residual or self.config.dropout > 0:
            return (f"LoRA with init={self.config.init!r}, dropout={self.config.dropout} does not; use"
                    " init='default' or 'gaussian' and dropout=0 there")
        return {"ColwiseParallel": {"A": "replicate", "B": 0}, "RowwiseParallel": {"A": 1, "B": "replicate"}}[style]

    @torch.no_grad()
    def init_from_weight(self, target: nn.Module, path: str = "") -> None:
        """PiSSA / OLoRA: ``A``, ``B`` (and the buffers ``A0``, ``B0``) from the target's weight, as PEFT.

        Computed in float32 from the ``(out, in)`` weight; deterministic given the weight, so a
        fresh backbone gets the same factors again when a checkpoint is loaded.
        """
        weight = target.weight
        if weight.device.type == "meta" or type(weight).__name__ == "DTensor" or is_quantized(weight):
            raise UnsupportedModuleError(
                f"lora init={self.config.init!r} needs {path or 'the target'}'s weight values at attach, not a"
                " meta, sharded or 4-bit tensor: attach after the pretrained weights are loaded, before sharding;"
                " on an NF4 backbone use init='default' or 'gaussian'")
        rank, scale = self.config.r, self.scale
        w = (weight.T if self.transposed else weight).float()
        if rank > min(w.shape):
            raise UnsupportedModuleError(
                f"lora init={self.config.init!r} needs r <= min(in, out); {path or 'a target'} is"
                f" {w.shape[1]} -> {w.shape[0]}, r={rank}")
        if self.config.init == "pissa":
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            root = torch.sqrt(s[:rank] / scale)
            a, b = root[:, None] * vh[:rank], u[:, :rank] * root[None, :]
        else:  # olora
            q, r = torch.linalg.qr(w)
            a, b = r[:rank], q[:, :rank]
        for param, value in ((self.A, a), (self.B, b), (self.A0, a), (self.B0, b)):
            param.copy_(value)

    def start_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (self.A0, self.B0) if self.residual else None

    def weight_offset(self) -> torch.Tensor | None:
        """``s B0 A0`` in the target weight's layout: what attach took out of the weight (PiSSA / OLoRA)."""
        if not self.residual:
            return None
        offset = (self.B0.float() @ self.A0.float()) * self.scale
        return offset.T if self.transposed else offset

    def _shift_weight(self, target: nn.Module, sign: int) -> None:
        offset = self.weight_offset()
        if offset is not None:
            add_in_float32_(target.weight, sign * offset)

    def on_attach(self, target: nn.Module) -> None:
        """PiSSA / OLoRA replace the weight by the residual ``W - s B0 A0``."""
        self._shift_weight(target, -1)

    def on_detach(self, target: nn.Module) -> None:
        """PiSSA / OLoRA add ``s B0 A0`` back, restoring the original weight."""
        self._shift_weight(target, +1)

    #: run the branch as one autograd function (:mod:`~lightning_delta.methods.fused_lora`) where it
    #: applies: every row, plain tensors of one dtype (or autocast). ``False`` keeps the composed-ops path.
    fused: bool = True

    def forward(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """``output + s * dropout(x) @ A.T @ B.T``; x ``(..., in)``, output ``(..., out)``.

        Computed in the activations' dtype: under a bf16 backbone the small factors are cast
        down (their gradients arrive in fp32), not the large activations up.
        """
        if self.fused and self.row_mask is None and type(x) is torch.Tensor and type(output) is torch.Tensor \
                and x.is_floating_point() and (x.dtype == output.dtype or torch.is_autocast_enabled(x.device.type)):
            return lora_branch(x, output, self.A, self.B, self.scale, self.config.dropout, self.training)
        x = self.dropout(x)
        gate = self.row_gate(x)
        if gate is not None and type(x).__name__ != "DTensor":
            # a mixed batch: the branch runs on this delta's rows only, not on every row then masked
            rows = gate.view(-1).nonzero().squeeze(1)
            return output.index_add(0, rows, self._branch(x.index_select(0, rows)).to(output.dtype))
        return self.add(output, self._branch(x).to(output.dtype))

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        """``s * x @ A.T @ B.T``; the scale goes into the small ``B``, not onto the (batch, seq, out) product."""
        return F.linear(F.linear(x, self.A.to(x.dtype)), (self.B * self.scale).to(x.dtype))

    def delta_weight(self, target: nn.Module) -> torch.Tensor:
        update = super().delta_weight(target)
        return update.T if self.transposed else update


class LoRAGALinear(LoRALinear):
    """LoRA-GA: starts from factors fitted to the weight's gradient (``A0 = A``, ``B0 = B``, set from the first
    training batches by :func:`~lightning_delta.data_inits.lora_ga_init`), kept as frozen, saved buffers whose
    product is subtracted: ``y = W x + s B A dropout(x) - s B0 A0 x``. The model starts as the backbone with its
    weights untouched (PEFT subtracts ``s B0 A0`` from ``W`` instead: the same function, the same gradients)."""

    row_selectable = False

    def __init__(self, config: Any, target: nn.Module):
        super().__init__(config, target)
        self.register_buffer("A0", torch.zeros_like(self.A))
        self.register_buffer("B0", torch.zeros_like(self.B))

    def start_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.A0, self.B0

    def forward(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        out = super().forward(x, output)
        return out - F.linear(F.linear(x, self.A0.to(x.dtype)), (self.B0 * self.scale).to(x.dtype)).to(out.dtype)

    def additive_update(self) -> torch.Tensor:
        return (self.B @ self.A - self.B0 @ self.A0) * self.scale

    def tensor_parallel_layout(self, style: str) -> str:
        return "LoRA-GA (init='lora_ga') has no tensor-parallel layout; use init='default' there"


class LoRAEmbedding(LoRA):
    """LoRA on ``nn.Embedding``: ``A`` is looked up like a table, then projected by ``B``."""

    def __init__(self, config: Any, target: nn.Embedding):
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

    def __init__(self, config: Any, target: nn.Conv2d):
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
