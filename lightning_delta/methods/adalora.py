"""AdaLoRA (Zhang et al., 2023): an SVD-form update whose rank budget is reallocated while training.

Per target ``y = base(x) + s * B diag(E) A dropout(x)`` with ``A`` ``(r, in)`` (right singular
vectors), ``E`` ``(r, 1)`` (singular values), ``B`` ``(out, r)`` (left singular vectors),
``r = init_r`` and ``s = alpha / init_r`` (PEFT's parameterisation: ``lora_A``, ``lora_E``,
``lora_B``, scaling ``lora_alpha / ranknum``). ``E`` starts at zero, ``A`` and ``B`` at
``N(0, 0.02^2)``: the identity at init.

:class:`RankAllocator` prunes triplets ``(A_i, E_i, B_i)`` to a shrinking budget, as PEFT's:
the importance of each entry is the smoothed sensitivity ``|p * grad|`` (EMA ``beta1``) times its
uncertainty (EMA ``beta2`` of the deviation); a triplet's score is ``E_i``'s plus the mean of its
row of ``A`` and column of ``B``. The total budget stays ``init_r * targets`` for ``tinit`` steps,
falls cubically to ``target_r * targets`` at step ``total_step - tfinal`` (masking every
``deltaT`` steps), and stays there. Masking zeroes ``E_i`` (pruned triplets may regrow until the
final allocation); the current mask is the persistent buffer ``rank_mask`` of each delta, so the
ranks are saved in delta-only checkpoints and restored on load. Used with
:class:`~lightning_delta.DeltaCallback`, the schedule follows the Trainer's ``global_step`` and the
orthogonal regulariser ``orth_reg_weight * mean ||A A^T - I||_F, ||B^T B - I||_F`` is added to
the gradients; in a plain loop call :meth:`RankAllocator.add_orth_reg_grad` after ``backward()``
and :meth:`RankAllocator.update_and_allocate` after ``optimizer.step()``, before ``zero_grad()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_delta.core import DeltaConfig, WeightUpdateDelta, iter_deltas
from lightning_delta.errors import DeltaConfigError
from lightning_delta.inits import fill_
from lightning_delta.targets import is_linear_like

_EPS = 1e-5  # PEFT divides by ranknum + 1e-5


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass
class AdaLoraConfig(DeltaConfig):
    """AdaLoRA hyper-parameters (names as PEFT's ``AdaLoraConfig``).

    Args:
        init_r: initial rank of every target (> 0).
        target_r: average rank at the end of the budget schedule (``0 < target_r <= init_r``).
        alpha: scaling numerator; the update is scaled by ``alpha / init_r``.
        dropout: dropout on the branch's input, in ``[0, 1)``.
        tinit: steps of warm-up before any pruning.
        tfinal: steps of final fine-tuning at the target budget.
        deltaT: steps between two reallocations in the budgeting phase.
        beta1: EMA coefficient of the sensitivity, in ``(0, 1)``.
        beta2: EMA coefficient of the uncertainty, in ``(0, 1)``.
        orth_reg_weight: weight of the orthogonal regulariser (``>= 0``; 0 turns it off).
        total_step: steps of the whole run; ``None``: the Trainer's ``estimated_stepping_batches``.
    """

    method = "adalora"
    lr: float = field(default=0.03, kw_only=True)  # benchmarks.quality --sweep
    supported_types = "nn.Linear and transformers Conv1D"

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 - PEFT's name
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None

    def training_hook(self, backbone: nn.Module, name: str, total_steps: float) -> RankAllocator:
        """The rank allocator of delta ``name``, over ``total_step`` or else the Trainer's ``total_steps``."""
        total = self.total_step or total_steps
        if total == float("inf"):
            raise DeltaConfigError(
                f"adalora delta {name!r}: the Trainer cannot tell the number of steps (max_steps=-1 and a"
                " loader without length); set AdaLoraConfig(total_step=...) or Trainer(max_steps=...)")
        return RankAllocator(backbone, name, total_step=int(total))

    def validate(self) -> None:
        self.check_range("init_r", self.init_r, _positive_int(self.init_r), "a positive integer, e.g. init_r=12")
        self.check_range("target_r", self.target_r, _positive_int(self.target_r) and self.target_r <= self.init_r,
                         f"a positive integer <= init_r={self.init_r!r}")
        self.check_range("alpha", self.alpha, isinstance(self.alpha, (int, float)) and self.alpha > 0,
                         "a positive number, e.g. alpha=8")
        self.check_range("dropout", self.dropout, isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1,
                         "in [0, 1), e.g. dropout=0.05")
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            self.check_range(name, value, isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                             "an integer >= 0")
        self.check_range("deltaT", self.deltaT, _positive_int(self.deltaT), "a positive integer, e.g. deltaT=10")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            self.check_range(name, value, isinstance(value, (int, float)) and 0 < value < 1, "in (0, 1), e.g. 0.85")
        self.check_range("orth_reg_weight", self.orth_reg_weight,
                         isinstance(self.orth_reg_weight, (int, float)) and self.orth_reg_weight >= 0, ">= 0")
        if self.total_step is not None:
            self.check_range("total_step", self.total_step, _positive_int(self.total_step),
                             "a positive integer, or None for the Trainer's number of steps")
            self.check_schedule(self.total_step)

    def check_schedule(self, total_step: int) -> None:
        """Raises :class:`DeltaConfigError` unless ``tinit < total_step - tfinal`` (a budgeting phase exists)."""
        if self.tinit >= total_step - self.tfinal:
            raise DeltaConfigError(
                f"adalora: tinit={self.tinit} and tfinal={self.tfinal} leave no budgeting phase in"
                f" total_step={total_step} steps; tinit < total_step - tfinal is needed")

    @property
    def scale(self) -> float:
        return self.alpha / (self.init_r + _EPS)

    def peft_config(self, deltas: list, **common):
        import peft

        # PEFT's format holds only the kept triplets, and PEFT resizes its layers to them on load
        rank_pattern = {f"{d.target_path}.lora_E": d.module.kept_triplets().tolist() for d in deltas}
        return peft.AdaLoraConfig(
            init_r=self.init_r, target_r=self.target_r, lora_alpha=self.alpha, lora_dropout=self.dropout,
            tinit=self.tinit, tfinal=self.tfinal, deltaT=self.deltaT, beta1=self.beta1, beta2=self.beta2,
            orth_reg_weight=self.orth_reg_weight, total_step=self.total_step or self.tinit + self.tfinal + 1,
            rank_pattern=rank_pattern, target_modules=[d.target_path for d in deltas],
            fan_in_fan_out=any(d.module.transposed for d in deltas), **common)

    def supports(self, module: nn.Module) -> bool:
        return is_linear_like(module)

    def build(self, module: nn.Module, seed: int, path: str = "") -> AdaLoRA:
        return AdaLoRA(self, module).seeded(seed)


class AdaLoRA(WeightUpdateDelta):
    """``A`` ``(r, in)``, ``E`` ``(r, 1)``, ``B`` ``(out, r)`` and the persistent ``rank_mask`` ``(r,)``."""


    def __init__(self, config: AdaLoraConfig, target: nn.Module) -> None:
        super().__init__(config, target)
        out_features, in_features = target.weight.shape[::-1] if self.transposed else target.weight.shape
        r = config.init_r
        self.A = nn.Parameter(torch.empty(r, in_features, **self.factory))
        self.E = nn.Parameter(torch.zeros(r, 1, **self.factory))
        self.B = nn.Parameter(torch.empty(out_features, r, **self.factory))
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=self.factory["device"]))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scale = config.scale

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``E = 0``, ``A`` and ``B`` ``N(0, 0.02^2)`` drawn from ``init_seed`` (PEFT's init), every rank kept."""
        generator = self.generator()
        for param in (self.A, self.B):
            fill_(param, lambda t: t.normal_(0.0, 0.02, generator=generator))
        self.E.zero_()
        if self.rank_mask.device.type != "meta":
            self.rank_mask.fill_(True)

    @property
    def rank(self) -> int:
        """The number of triplets the current mask keeps."""
        return int(self.rank_mask.sum())

    @torch.no_grad()
    def apply_mask(self) -> None:
        """Zeroes the singular values of pruned triplets."""
        self.E.masked_fill_(~self.rank_mask[:, None], 0.0)

    def kept_triplets(self) -> torch.Tensor:
        """The triplets that contribute to the output (mask on, or a regrown singular value)."""
        return self.rank_mask | (self.E.detach().view(-1) != 0)

    def peft_state(self, prefix: str) -> dict[str, torch.Tensor]:
        keep = self.kept_triplets()
        return {f"{prefix}.lora_A": self.A.detach()[keep], f"{prefix}.lora_E": self.E.detach()[keep],
                f"{prefix}.lora_B": self.B.detach()[:, keep]}

    def forward(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """``output + s * dropout(x) @ (A * E).T @ B.T``; x ``(..., in)``, output ``(..., out)``."""
        x = self.dropout(x)
        hidden = F.linear(x, (self.A * self.E).to(x.dtype))
        return output + F.linear(hidden, (self.B * self.scale).to(x.dtype)).to(output.dtype)

    def update(self) -> torch.Tensor:
        """``s * B @ (A * E)`` in ``(out, in)`` layout."""
        return (self.B @ (self.A * self.E)) * self.scale

    def orth_penalties(self) -> list[torch.Tensor]:
        """``||A A^T - I||_F`` and ``||B^T B - I||_F`` (PEFT's orthogonal regulariser terms)."""
        eye = torch.eye(self.A.shape[0], device=self.A.device, dtype=self.A.dtype)
        return [torch.linalg.matrix_norm(self.A @ self.A.T - eye), torch.linalg.matrix_norm(self.B.T @ self.B - eye)]



class RankAllocator:
    """PEFT's AdaLoRA rank allocator for the delta ``name`` of ``model``.

    Args:
        model: the module holding the deltas (the backbone).
        name: the delta's name.
        total_step: overrides the config's ``total_step`` (e.g. the Trainer's step count).

    ``history`` records ``(step, budget, kept ranks)`` at every reallocation.
    """

    def __init__(self, model: nn.Module, name: str, total_step: int | None = None) -> None:
        self.model, self.name = model, name
        modules = self.modules()
        if not modules:
            raise DeltaConfigError(f"no adalora delta named {name!r} is attached")
        self.config: AdaLoraConfig = modules[0][1].config
        self.total_step = total_step if total_step is not None else self.config.total_step
        if self.total_step is None:
            raise DeltaConfigError("adalora needs total_step: set it in AdaLoraConfig or train with DeltaCallback")
        self.config.check_schedule(self.total_step)
        self.init_budget = sum(module.A.shape[0] for _, module in modules)
        self.target_budget = self.config.target_r * len(modules)
        self.history: list[tuple[int, int, int]] = []
        self.reset_ipt()

    def modules(self) -> list[tuple[str, AdaLoRA]]:
        """``(path, delta)`` of every target of the delta, in model order."""
        return [(d.path, d.module) for d in iter_deltas(self.model, self.name) if isinstance(d.module, AdaLoRA)]

    def reset_ipt(self) -> None:
        self.ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    @property
    def kept(self) -> int:
        """Triplets kept by the current masks, over all targets."""
        return sum(module.rank for _, module in self.modules())

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """The budget at ``step`` and whether to reallocate then (PEFT's cubic schedule)."""
        tinit, tfinal, total = self.config.tinit, self.config.tfinal, self.total_step
        if step <= tinit:
            return self.init_budget, False
        if step > total - tfinal:
            return self.target_budget, True
        mul = 1 - (step - tinit) / (total - tfinal - tinit)
        budget = int((self.init_budget - self.target_budget) * mul**3 + self.target_budget)
        return budget, step % self.config.deltaT == 0

    @torch.no_grad()
    def update_ipt(self) -> None:
        """Updates the sensitivity and uncertainty EMAs from the current gradients."""
        beta1, beta2 = self.config.beta1, self.config.beta2
        for path, module in self.modules():
            for tensor_name in ("A", "E", "B"):
                param = getattr(module, tensor_name)
                if param.grad is None:
                    continue
                key = f"{path}.{tensor_name}"
                if key not in self.ipt:
                    self.exp_avg_ipt[key] = torch.zeros_like(param)
                    self.exp_avg_unc[key] = torch.zeros_like(param)
                self.ipt[key] = (param * param.grad).abs()
                self.exp_avg_ipt[key] = beta1 * self.exp_avg_ipt[key] + (1 - beta1) * self.ipt[key]
                self.exp_avg_unc[key] = (beta2 * self.exp_avg_unc[key]
                                         + (1 - beta2) * (self.ipt[key] - self.exp_avg_ipt[key]).abs())

    def _score(self, key: str) -> torch.Tensor:
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        """Keeps the ``budget`` most important triplets over all targets, zeroing the others' ``E``."""
        modules = self.modules()
        if any(f"{path}.E" not in self.exp_avg_ipt for path, _ in modules):
            return  # no gradients seen yet: nothing to rank by
        scores = {}
        for path, _ in modules:
            a = self._score(f"{path}.A").mean(dim=1)
            b = self._score(f"{path}.B").mean(dim=0)
            scores[path] = self._score(f"{path}.E").view(-1) + a + b
        pruned = self.init_budget - budget
        if pruned > 0:
            threshold = torch.kthvalue(torch.cat([s.float().cpu() for s in scores.values()]), k=pruned)[0].item()
        for path, module in modules:
            keep = scores[path] > threshold if pruned > 0 else torch.ones_like(module.rank_mask)
            module.rank_mask.copy_(keep.to(module.rank_mask.device))
            module.apply_mask()

    def update_and_allocate(self, step: int) -> int:
        """One call per optimizer step, after ``optimizer.step()`` and before ``zero_grad()``; returns the budget.

        Before ``total_step - tfinal`` the importance is updated from the gradients and the masks
        follow the schedule; at that step the target budget is allocated for good; after it the
        final masks are re-applied (the optimizer moves masked values).
        """
        final = self.total_step - self.config.tfinal
        budget, reallocate = self.budget_schedule(step)
        if step < final:
            self.update_ipt()
            if reallocate:
                self.mask_to_budget(budget)
                self.history.append((step, budget, self.kept))
        elif step == final:
            self.update_ipt()
            self.mask_to_budget(budget)
            self.history.append((step, budget, self.kept))
            self.reset_ipt()
        else:
            for _, module in self.modules():
                module.apply_mask()
        return budget

    def orth_reg(self) -> torch.Tensor:
        """``orth_reg_weight`` times the mean of the orthogonality penalties over every ``A`` and ``B``."""
        terms = [t for _, module in self.modules() for t in module.orth_penalties()]
        return self.config.orth_reg_weight * torch.stack(terms).mean()

    def after_step(self, step: int) -> None:
        """The training hook's step: :meth:`update_and_allocate`."""
        self.update_and_allocate(step)

    def after_backward(self, factor: float = 1.0) -> None:
        """The training hook's backward: :meth:`add_orth_reg_grad`."""
        self.add_orth_reg_grad(factor)

    def add_orth_reg_grad(self, factor: float = 1.0) -> float:
        """Adds ``factor`` times the gradient of :meth:`orth_reg` to ``A.grad`` and ``B.grad``; returns its value.

        The same as adding the regulariser to the loss, without a second backward through the
        model: only the small factors are differentiated (``torch.autograd.grad``, so no DDP
        gradient hook fires a second time). ``factor`` carries a loss scale and the division by
        the number of accumulated batches.
        """
        if self.config.orth_reg_weight == 0:
            return 0.0
        params = [p for _, module in self.modules() for p in (module.A, module.B) if p.requires_grad]
        if not params:
            return 0.0
        with torch.enable_grad():
            value = self.orth_reg()
            grads = torch.autograd.grad(value * factor, params)
        with torch.no_grad():
            for param, grad in zip(params, grads, strict=True):
                if param.grad is None:
                    param.grad = grad.to(param.dtype)
                else:
                    param.grad.add_(grad.to(param.grad.dtype))
        return float(value.detach())

    def state_dict(self) -> dict[str, Any]:
        """The importance EMAs, total steps and history (the masks live in the model's state)."""
        return {"total_step": self.total_step, "history": [list(h) for h in self.history],
                "exp_avg_ipt": dict(self.exp_avg_ipt), "exp_avg_unc": dict(self.exp_avg_unc)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.total_step = state["total_step"]
        self.history = [tuple(h) for h in state["history"]]
        devices = {f"{path}.{t}": getattr(module, t).device for path, module in self.modules() for t in "AEB"}
        self.exp_avg_ipt = {k: v.to(devices.get(k, v.device)) for k, v in state["exp_avg_ipt"].items()}
        self.exp_avg_unc = {k: v.to(devices.get(k, v.device)) for k, v in state["exp_avg_unc"].items()}
