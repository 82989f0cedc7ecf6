"""LoRA (Hu et al., 2021): a trainable low-rank update ``W + s * B @ A`` beside a frozen weight.

``y = base(x) + s * B(A(dropout(x)))`` with ``A`` of shape ``(r, in)``, ``B`` of shape
``(out, r)``, ``s = alpha / r`` (``alpha / sqrt(r)`` with ``rslora=True``) and ``B = 0`` at
init, so the attached model computes exactly what the backbone did. Supported targets:
``nn.Linear``, transformers' ``Conv1D`` (GPT-2, weight stored ``(in, out)``), ``nn.Embedding``
and ``nn.Conv2d`` (``A`` is a conv with the target's kernel, ``B`` a 1x1 conv), and a
mixture-of-experts' fused 3-D expert parameters named by path (``"mlp.experts.gate_up_proj"``:
one pair per expert, :mod:`~lightning_delta.methods.expert_lora`).

Initialisations (``init``), as PEFT's ``init_lora_weights``:

* ``"default"``: ``A`` Kaiming-uniform, ``B = 0``.
* ``"gaussian"``: ``A ~ N(0, (1/r)^2)`` (standard deviation ``1/r``), ``B = 0``.
* ``"pissa"`` (Meng et al., 2024): ``s B0 A0`` is the best rank-``r`` approximation of ``W`` (top
  singular triplets, ``A0 = sqrt(S_r / s) V_r^T``, ``B0 = U_r sqrt(S_r / s)``).
* ``"olora"`` (Büyükakyüz, 2024): ``W = Q R``; ``B0`` = the first ``r`` columns of ``Q``, ``A0``
  the first ``r`` rows of ``R``.

PiSSA and OLoRA start with a non-zero update, so at attach the frozen weight becomes the residual
``W - s B0 A0`` (the model still computes what the backbone did, up to float rounding), and
detach adds ``s B0 A0`` back (in float32: exact up to the rounding of the weight's dtype, which
for a bf16/fp16 backbone holding the residual is that dtype's precision). ``A0`` and ``B0`` stay
as non-persistent buffers: recomputed from the original weight at every attach (so a delta-only
checkpoint needs no extra tensors), and used to write a PEFT export relative to the original
weight (rank ``2r``, as PEFT's conversion).
They need linear-like targets holding real (non-meta, unsharded) weights at attach.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lightning_delta.core import Delta, DeltaConfig, iter_deltas
from lightning_delta.data_inits import eva_init
from lightning_delta.errors import UnsupportedModuleError
from lightning_delta.inits import as_shape, fill_, kaiming_
from lightning_delta.methods.expert_lora import ExpertLoRA, expert_targets, targets_with_experts
from lightning_delta.methods.fused_lora import lora_branch
from lightning_delta.targets import is_linear_like, matches, normalize_patterns
from lightning_delta.tensors import is_quantized

#: ``init`` values; "pissa" and "olora" replace the frozen weight by a residual at attach, "eva" starts from
#: the training data (:mod:`~lightning_delta.data_inits`, run by ``DeltaCallback`` at fit start).
LORA_INITS = ("default", "gaussian", "pissa", "olora", "eva")
RESIDUAL_INITS = ("pissa", "olora")


@dataclass
class LoraConfig(DeltaConfig):
    """LoRA hyper-parameters.

    Args:
        r: rank of the update (> 0).
        alpha: scaling numerator; the update is scaled by ``alpha / r``.
        dropout: dropout on the LoRA branch's input, in ``[0, 1)``.
        rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA) instead.
        init: initial values, one of ``"default"``, ``"gaussian"``, ``"pissa"``, ``"olora"``, ``"eva"`` (see
            the module docstring); ``"pissa"`` and ``"olora"`` need ``nn.Linear`` / ``Conv1D`` targets
            and ``r <= min(in, out)``; ``"eva"`` ``nn.Linear`` / ``Conv1D`` targets and ``DeltaCallback``.
        init_batches: ``init="eva"``: at most this many training batches at fit start.
        eva_tau: ``init="eva"``: a target's components count as converged (and stop updating) once each
            has a cosine similarity of at least this with its value one batch before.
    """

    method = "lora"
    loraplus_params = ("B",)  # LoRA+: B learns loraplus_lr_ratio times faster
    lr: float = field(default=0.005, kw_only=True)  # benchmarks.quality --sweep
    supported_types = ("nn.Linear, transformers Conv1D, nn.Embedding and nn.Conv2d (groups=1), and fused expert"
                       " parameters by their path (e.g. 'mlp.experts.gate_up_proj')")

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    init: str = "default"
    init_batches: int = 8
    eva_tau: float = 0.99

    def validate(self) -> None:
        self.check_range("init", self.init, self.init in LORA_INITS, f"one of {', '.join(map(repr, LORA_INITS))}")
        self.check_range("r", self.r, isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0,
                         "a positive integer, e.g. r=8")
        self.check_range("alpha", self.alpha, isinstance(self.alpha, (int, float)) and self.alpha > 0,
                         "a positive number, e.g. alpha=16")
        self.check_range("dropout", self.dropout, isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1,
                         "in [0, 1), e.g. dropout=0.05")
        self.check_range("init_batches", self.init_batches, isinstance(self.init_batches, int)
                         and not isinstance(self.init_batches, bool) and self.init_batches > 0, "a positive integer")
        self.check_range("eva_tau", self.eva_tau, isinstance(self.eva_tau, (int, float)) and 0 < self.eva_tau <= 1,
                         "in (0, 1], e.g. eva_tau=0.99")

    def data_batches(self) -> int:
        return self.init_batches if self.init == "eva" else 0

    def init_from_data(self, backbone, name, batches, forward):
        """EVA: each target's ``A`` from its inputs' principal directions (see :mod:`~lightning_delta.data_inits`)."""
        deltas = [(d, backbone.get_submodule(d.target_path)) for d in iter_deltas(backbone, name)]
        return eva_init(deltas, batches, forward, r=self.r, tau=self.eva_tau, limit=self.init_batches)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def peft_config(self, deltas: list, **common):
        import peft

        experts = [d for d in deltas if isinstance(d.module, ExpertLoRA)]
        modules = [d for d in deltas if not isinstance(d.module, ExpertLoRA)]
        fan_in_fan_out = any(getattr(d.module, "transposed", False) for d in modules)
        r, alpha = self.r, self.alpha
        if deltas[0].module.weight_offset() is not None:  # PiSSA / OLoRA: rank 2r, same scale (see peft_state)
            r, alpha = 2 * r, alpha * (2**0.5 if self.rslora else 2)
        parameters = [f"{d.target_path}.{name}" for d in experts for name in d.module.parameter_names]
        return peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=self.dropout, use_rslora=self.rslora,
                               use_dora=self.method == "dora", target_modules=[d.target_path for d in modules],
                               fan_in_fan_out=fan_in_fan_out, **({"target_parameters": parameters} if parameters
                                                                 else {}), **common)

    peft_type = "LORA"

    @classmethod
    def reads_peft(cls, settings):
        return super().reads_peft(settings) and not settings.get("use_dora")

    @classmethod
    def from_peft(cls, settings, parts, name):
        cls.refuse_peft_options(settings, {"rank_pattern": {}, "alpha_pattern": {}, "bias": "none"})
        parameters = list(settings.get("target_parameters") or [])
        # the experts modules of target_parameters hold PEFT's factors for those parameters, not module targets
        modules = [p for p in sorted(parts) if not any(matches(p, t.rpartition(".")[0]) for t in parameters)]
        return cls(r=int(settings["r"]), alpha=float(settings["lora_alpha"]),
                   dropout=float(settings.get("lora_dropout") or 0.0), rslora=bool(settings.get("use_rslora")),
                   targets=modules + parameters, **({"name": name} if name else {}))

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, nn.Conv2d):
            return module.groups == 1 and module.padding_mode == "zeros"
        return is_linear_like(module) or isinstance(module, nn.Embedding)

    def target_names(self, model: nn.Module) -> list[str]:
        """The modules the targets name, and the experts modules whose fused parameters they name (see
        :mod:`~lightning_delta.methods.expert_lora`); ``"all-linear"`` leaves experts out, with a warning."""
        return targets_with_experts(self, model)

    def build(self, module: nn.Module, seed: int, path: str = "") -> LoRA | ExpertLoRA:
        if self.init == "eva" and not is_linear_like(module):
            raise UnsupportedModuleError(
                f"lora init='eva' starts from a linear layer's inputs; {path or 'a target'} is a"
                f" {type(module).__name__}: exclude it or use init='default'")
        if not self.supports(module):  # an experts module whose fused parameters the targets name
            names = next(iter(expert_targets(module, normalize_patterns(self.targets), normalize_patterns(self.exclude),
                                             lambda name, pattern: matches(f"{path}.{name}", pattern)).values()))
            if self.method != "lora" or self.init not in ("default", "gaussian"):
                raise UnsupportedModuleError(
                    f"{self.method} init={self.init!r} on fused expert parameters ({path}: {', '.join(names)}) is"
                    " not supported; use LoRA with init='default' or 'gaussian' there")
            return ExpertLoRA(self, module, names).seeded(seed)
        if self.init in RESIDUAL_INITS and not is_linear_like(module):
            raise UnsupportedModuleError(
                f"lora init={self.init!r} decomposes a linear weight; {path or 'a target'} is a"
                f" {type(module).__name__}: exclude it or use init='default' / 'gaussian'")
        if isinstance(module, nn.Embedding):
            delta: LoRA = LoRAEmbedding(self, module)
        elif isinstance(module, nn.Conv2d):
            delta = LoRAConv2d(self, module)
        else:
            delta = LoRALinear(self, module)
        delta.seeded(seed)
        if self.init in RESIDUAL_INITS:
            delta.init_from_weight(module, path)
        return delta


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
        """``A`` Kaiming-uniform (as ``nn.Linear`` and PEFT) or Gaussian drawn from ``init_seed``, ``B`` zero.

        The delta starts as the identity, with the same values on every rank; Lightning calls this
        when it materialises a model built on the meta device. PiSSA / OLoRA factors come from the
        target's weight instead (:meth:`LoRALinear.init_from_weight`).
        """
        self.B.zero_()
        if self.config.init == "gaussian":
            generator, std = self.generator(), 1 / self.config.r
            fill_(self.A, lambda t: t.normal_(0.0, std, generator=generator))
        else:
            kaiming_(self.A, self.generator())

    def peft_state(self, prefix: str) -> dict[str, torch.Tensor]:
        a, b = self.A.detach(), self.B.detach()
        if self.weight_offset() is not None:
            # trained beside the residual W - s B0 A0, loaded onto W: W_res + s B A = W + s [B, -B0] [A; A0],
            # as PEFT's own conversion of PiSSA / OLoRA adapters
            a, b = torch.cat([a, self.A0.to(a.dtype)], dim=0), torch.cat([b, -self.B0.to(b.dtype)], dim=1)
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

    def weight_offset(self) -> torch.Tensor | None:
        """``s B0 A0`` in the target weight's layout: what attach took out of the weight (PiSSA / OLoRA)."""
        if not self.residual:
            return None
        offset = (self.B0.float() @ self.A0.float()) * self.scale
        return offset.T if self.transposed else offset

    def _shift_weight(self, target: nn.Module, sign: int) -> None:
        offset = self.weight_offset()
        if offset is not None:
            with torch.no_grad():
                weight = target.weight
                weight.copy_((weight.float() + sign * offset.to(weight.device)).to(weight.dtype))

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
