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
* ``"eva"`` (Paischer et al., 2024) and ``"lora_ga"`` (Wang et al., 2024): from the first ``init_batches``
  training batches, which ``DeltaCallback`` runs at fit start (:mod:`~lightning_delta.data_inits`).

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

from torch import nn

from lightning_delta.core import DeltaConfig, iter_deltas
from lightning_delta.data_inits import eva_init, lora_ga_init
from lightning_delta.errors import UnsupportedModuleError
from lightning_delta.methods.expert_lora import (
    ExpertLoRA,
    expert_targets,
    fused_expert_parameters,
    targets_with_experts,
)
from lightning_delta.methods.lora_modules import (
    RESIDUAL_INITS,
    LoRA,
    LoRAConv2d,
    LoRAEmbedding,
    LoRAGALinear,
    LoRALinear,
)
from lightning_delta.targets import is_linear_like, matches, normalize_patterns

#: ``init`` values; "pissa" and "olora" replace the frozen weight by a residual at attach, "eva" starts from
#: the training data (:mod:`~lightning_delta.data_inits`, run by ``DeltaCallback`` at fit start).
LORA_INITS = ("default", "gaussian", "pissa", "olora", "eva", "lora_ga")
#: ``init`` values that start from the training data
DATA_INITS = ("eva", "lora_ga")


@dataclass
class LoraConfig(DeltaConfig):
    """LoRA hyper-parameters.

    Args:
        r: rank of the update (> 0).
        alpha: scaling numerator; the update is scaled by ``alpha / r``.
        dropout: dropout on the LoRA branch's input, in ``[0, 1)``.
        rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA) instead.
        init: initial values, one of ``"default"``, ``"gaussian"``, ``"pissa"``, ``"olora"``, ``"eva"``,
            ``"lora_ga"`` (see the module docstring); ``"pissa"``, ``"olora"`` need ``nn.Linear`` / ``Conv1D``
            targets and ``r <= min(in, out)``; ``"eva"`` and ``"lora_ga"`` (``2r <= min(in, out)``) need
            ``nn.Linear`` / ``Conv1D`` targets and ``DeltaCallback``, which runs them at fit start.
        init_batches: ``init="eva"`` or ``"lora_ga"``: at most this many training batches at fit start.
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
        return self.init_batches if self.init in DATA_INITS else 0

    def init_from_data(self, backbone, name, batches, forward):
        """EVA: each target's ``A`` from its inputs' principal directions; LoRA-GA: ``A``, ``B`` from the gradient
        of its weight (see :mod:`~lightning_delta.data_inits`)."""
        deltas = [(d, backbone.get_submodule(d.target_path)) for d in iter_deltas(backbone, name)]
        if self.init == "lora_ga":
            return lora_ga_init(deltas, batches, forward, limit=self.init_batches)
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
        if any(getattr(d.module, "start_factors", lambda: None)() is not None for d in deltas):
            # PiSSA / OLoRA / LoRA-GA: rank 2r, same scale (see peft_state)
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
        if self.init in DATA_INITS and not is_linear_like(module):
            raise UnsupportedModuleError(
                f"lora init={self.init!r} starts from a linear layer's inputs or gradient; {path or 'a target'} is a"
                f" {type(module).__name__}: exclude it or use init='default'")
        if self.init == "lora_ga" and 2 * self.r > min(module.weight.shape):
            raise UnsupportedModuleError(
                f"lora init='lora_ga' takes 2r = {2 * self.r} singular directions of the gradient; {path or 'a target'}"
                f" has a {tuple(module.weight.shape)} weight: use r <= {min(module.weight.shape) // 2}")
        if not self.supports(module):  # an experts module whose fused parameters the targets name
            chosen = expert_targets(fused_expert_parameters(module), normalize_patterns(self.targets),
                                    normalize_patterns(self.exclude),
                                    lambda name, pattern: matches(f"{path}.{name}", pattern))
            names = next(iter(chosen.values()))
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
            delta = LoRAGALinear(self, module) if self.init == "lora_ga" else LoRALinear(self, module)
        delta.seeded(seed)
        if self.init in RESIDUAL_INITS:
            delta.init_from_weight(module, path)
        return delta
