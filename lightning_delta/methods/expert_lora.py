"""LoRA on fused expert parameters: one low-rank pair per expert on a mixture-of-experts' 3-D weights.

transformers 5 stores a layer's experts as 3-D parameters (Qwen3-MoE, Mixtral, ...):
``experts.gate_up_proj`` ``(E, out, in)`` and ``experts.down_proj``, or ``(E, in, out)`` where the
experts module says ``is_transposed``. An :class:`ExpertLoRA` on such a module holds, per targeted
parameter, ``A`` ``(E, r, in)`` and ``B`` ``(E, out, r)``; expert ``e``'s weight reads
``W[e] + s * B[e] @ A[e]``.

It is applied without copying or renaming the frozen weight and without forming ``W + s B A``:
while the delta is active, the experts module runs its own eager forward (each hit expert in
turn) inside the delta's call, and reading the parameter there gives an :class:`ExpertView` whose
per-expert slice turns
``F.linear(x, W[e])`` (or ``x @ W[e]``) into ``x W[e]^T + s (x A[e]^T) B[e]^T``. Any other use of
the view (a code path written for whole tensors) gets the dense sum instead: right, only heavier.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lightning_delta.core import Delta, DeltaConfig
from lightning_delta.errors import DeltaConfigError
from lightning_delta.methods.lora_modules import add_in_float32_, draw_a_
from lightning_delta.targets import ALL_LINEAR, candidate_modules, matches, normalize_patterns, resolve_targets

#: Attribute of an experts module holding the views its eager forward reads while deltas apply.
VIEWS_ATTR = "_lightning_delta_expert_views"


def _fused_names(module: nn.Module) -> list[str]:
    """The names of ``module``'s 3-D parameters holding one slice per expert (it says how many: ``num_experts``)."""
    count = getattr(module, "num_experts", None)
    if not isinstance(count, int) or getattr(type(module), "is_delta", False):
        return []
    return [name for name, p in module._parameters.items() if p is not None and p.dim() == 3 and p.shape[0] == count]


def fused_expert_parameters(model: nn.Module) -> dict[str, tuple[str, str]]:
    """``{parameter path: (experts module path, parameter name)}`` of every fused 3-D expert parameter."""
    return {f"{path}.{name}" if path else name: (path, name)
            for path, module in model.named_modules() for name in _fused_names(module)}


def expert_targets(fused: dict[str, tuple[str, str]], patterns: tuple[str, ...], exclude: tuple[str, ...],
                   matches: Callable[[str, str], bool]) -> dict[str, list[str]]:
    """``{experts module path: [parameter names]}`` of the ``fused`` parameters (:func:`fused_expert_parameters`)
    that ``patterns`` address (as a module path would be: exact, dot-suffix or ``re:``), in the module's order
    (PEFT nests its wrappers in it)."""
    chosen: dict[str, list[str]] = {}
    for path, (module_path, name) in fused.items():
        if any(matches(path, p) for p in patterns) and not any(matches(path, e) for e in exclude):
            chosen.setdefault(module_path, []).append(name)
    return chosen


def targets_with_experts(config: DeltaConfig, model: nn.Module) -> list[str]:
    """``config``'s target modules in ``model``, and the experts modules whose fused parameters its targets
    name; ``"all-linear"`` leaves the experts out and warns, naming what it left."""
    patterns = normalize_patterns(config.preset(model) if config.targets is None else config.targets)
    exclude = normalize_patterns(config.exclude)
    params = fused_expert_parameters(model)
    experts = expert_targets(params, patterns, exclude, matches)
    by_module = [p for p in patterns if not any(matches(path, p) for path in params)]
    found = set(resolve_targets(model, by_module, config.supports, exclude=exclude, method=config.method,
                                supported_types=config.supported_types) if by_module else ())
    for pattern in set(patterns) - set(by_module):  # naming expert parameters, and maybe modules too
        found.update(n for n, m in candidate_modules(model) if matches(n, pattern) and config.supports(m)
                     and not any(matches(n, e) for e in exclude))
    left_out = [p for p, (m, n) in params.items() if n not in experts.get(m, ())]
    if ALL_LINEAR in patterns and left_out:
        tails = sorted({".".join(p.split(".")[-2:]) for p in left_out})
        warnings.warn(
            f"targets='all-linear' leaves out {len(left_out)} fused expert parameters (the experts' weights:"
            f" {', '.join(tails)}); name them to tune the experts too, e.g. targets=['all-linear',"
            f" {', '.join(repr(t) for t in tails)}]", stacklevel=3)
    return [n for n, _ in model.named_modules() if n in found or n in experts]


def _fold(factors: list[tuple[torch.Tensor, torch.Tensor, float]], dtype: torch.dtype) -> torch.Tensor:
    """``sum s B @ A`` over the factor pairs, batched over any leading dimensions."""
    return sum(s * (b.to(dtype) @ a.to(dtype)) for a, b, s in factors)


class ExpertView:
    """What an experts module's forward reads in place of a fused parameter while LoRAs apply to it.

    Indexing selects experts (the factors with them); ``F.linear`` / ``matmul`` with a one-expert
    view run the low-rank branch beside the frozen weight; every other torch function sees the
    dense ``W + s B A``.
    """

    def __init__(self, weight: torch.Tensor, factors: list[tuple[torch.Tensor, torch.Tensor, float]],
                 transposed: bool, dropout: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.weight, self.factors, self.transposed, self.dropout = weight, factors, transposed, dropout

    shape = property(lambda self: self.weight.shape)
    dtype = property(lambda self: self.weight.dtype)
    device = property(lambda self: self.weight.device)
    ndim = property(lambda self: self.weight.ndim)

    def size(self, dim: int | None = None) -> Any:
        return self.weight.size() if dim is None else self.weight.size(dim)

    def dim(self) -> int:
        return self.weight.dim()

    def __getitem__(self, index: Any) -> ExpertView:
        return ExpertView(self.weight[index], [(a[index], b[index], s) for a, b, s in self.factors],
                          self.transposed, self.dropout)

    def dense(self) -> torch.Tensor:
        """``W + s B A`` in the weight's layout (what any other use of the view sees)."""
        update = _fold(self.factors, self.weight.dtype)
        return self.weight + (update.transpose(-1, -2) if self.transposed else update)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """``s (x A^T) B^T`` summed over the factor pairs of one expert."""
        x = self.dropout(x)
        return sum(s * F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) for a, b, s in self.factors)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if len(args) >= 2 and isinstance(args[1], ExpertView) and args[1].weight.dim() == 2 and \
                isinstance(args[0], torch.Tensor):
            x, view = args[0], args[1]
            if func is F.linear and not view.transposed:
                return F.linear(x, view.weight, *args[2:], **kwargs) + view.branch(x)
            if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) and view.transposed:
                return torch.matmul(x, view.weight) + view.branch(x)
        dense = {id(a): a.dense() for a in (*args, *kwargs.values()) if isinstance(a, ExpertView)}
        return func(*[dense.get(id(a), a) for a in args], **{k: dense.get(id(v), v) for k, v in kwargs.items()})


def _delta_views(module: nn.Module) -> dict[str, ExpertView]:
    """The views of ``module``'s fused parameters under its active, unmerged expert LoRAs."""
    pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
    dropout: Callable[[torch.Tensor], torch.Tensor] = nn.Identity()
    for child in module.children():
        if isinstance(child, ExpertLoRA) and not child.idle:
            for name in child.parameter_names:
                pairs.setdefault(name, []).append((child.A[name], child.B[name], child.scale))
            dropout = child.dropout if isinstance(child.dropout, nn.Dropout) else dropout
    transposed = bool(getattr(module, "is_transposed", False))
    return {name: ExpertView(module._parameters[name], factors, transposed, dropout)
            for name, factors in pairs.items()}


_SWAPPED: dict[type, type] = {}


def _parameter_property(name: str) -> property:
    def read(self: nn.Module) -> Any:
        views = self.__dict__.get(VIEWS_ATTR)
        return views[name] if views and name in views else self._parameters[name]

    def write(self: nn.Module, value: Any) -> None:
        nn.Module.__setattr__(self, name, value)

    return property(read, write)


def _with_expert_views(cls: type) -> type:
    """A subclass of an experts class whose forward, while expert LoRAs apply, runs through them (see
    :meth:`ExpertLoRA.forward`) into the eager path with views; otherwise the class's own forward."""
    if cls not in _SWAPPED:
        fused = getattr(cls, "forward")
        eager = getattr(fused, "__wrapped__", fused)  # transformers' experts-implementation dispatcher wraps it

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            active = [c for c in self.children() if isinstance(c, ExpertLoRA) and not c.idle]
            if not active:
                return fused(self, *args, **kwargs)
            return active[0](self, active[1:], eager, args, kwargs)

        swapped = type(cls.__name__, (cls,), {"forward": forward, "_lightning_delta_base": cls})
        swapped.__qualname__ = cls.__qualname__
        _SWAPPED[cls] = swapped
    return _SWAPPED[cls]


def _swap_in(module: nn.Module, names: list[str]) -> None:
    cls = _with_expert_views(getattr(type(module), "_lightning_delta_base", type(module)))
    for name in names:
        if not isinstance(cls.__dict__.get(name), property):
            setattr(cls, name, _parameter_property(name))
    if not isinstance(module, cls):
        module.__class__ = cls


class ExpertLoRA(Delta):
    """LoRA factors for some fused parameters of one experts module (``A``/``B`` keyed by parameter name)."""

    mergeable = True
    row_selectable: ClassVar[bool] = False

    def __init__(self, config: DeltaConfig, target: nn.Module, parameter_names: list[str]) -> None:
        weight = target._parameters[parameter_names[0]]
        super().__init__(config, target)
        self.storage_dtype = config.storage_dtype(weight)
        self.factory = {"device": weight.device, "dtype": self.storage_dtype}
        self.parameter_names = list(parameter_names)
        self.experts_transposed = bool(getattr(target, "is_transposed", False))
        self.scale = config.scale
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for name in self.parameter_names:
            experts, rows, cols = target._parameters[name].shape
            out_features, in_features = (cols, rows) if self.experts_transposed else (rows, cols)
            self.A[name] = nn.Parameter(torch.empty(experts, config.r, in_features, **self.factory))
            self.B[name] = nn.Parameter(torch.zeros(experts, out_features, config.r, **self.factory))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each expert's ``A`` as LoRA's (Kaiming-uniform or Gaussian from ``init_seed``), ``B`` zero: identity."""
        generator = self.generator()
        for name in self.parameter_names:
            self.B[name].zero_()
            for a in self.A[name]:
                draw_a_(a, self.config, generator)

    def hook_into(self, target: nn.Module) -> None:
        _swap_in(target, self.parameter_names)

    def unhook_from(self, target: nn.Module) -> None:
        others = [c for c in target.children() if isinstance(c, ExpertLoRA) and c is not self]
        if not others and "_lightning_delta_base" in type(target).__dict__:  # (a class FSDP made stays)
            target.__class__ = type(target)._lightning_delta_base

    def forward(self, experts: nn.Module, rest: list[ExpertLoRA], eager: Callable[..., Any], args: tuple,
                kwargs: dict) -> Any:
        """The experts module's eager forward with this delta's (and ``rest``'s) factors in its weights.

        It runs inside this module's call, so a wrapper that gathers a module's parameters around its
        forward (FSDP2, ZeRO-3) has them whole for the experts' computation and its backward.
        """
        if rest:
            return rest[0](experts, rest[1:], eager, args, kwargs)
        experts.__dict__[VIEWS_ATTR] = _delta_views(experts)
        try:
            return eager(experts, *args, **kwargs)
        finally:
            del experts.__dict__[VIEWS_ATTR]

    def update(self, name: str) -> torch.Tensor:
        """``s * B @ A`` of parameter ``name`` in its layout, ``(E, out, in)`` or ``(E, in, out)``."""
        update = _fold([(self.A[name], self.B[name], self.scale)], torch.float32)
        return update.transpose(-1, -2) if self.experts_transposed else update

    def _add(self, target: nn.Module, sign: int) -> None:
        for name in self.parameter_names:
            add_in_float32_(target._parameters[name], sign * self.update(name))

    def merge(self, target: nn.Module) -> None:
        if not self.merged:
            self._add(target, +1)
            self.merged = True

    def unmerge(self, target: nn.Module) -> None:
        if self.merged:
            self._add(target, -1)
            self.merged = False

    def tensor_parallel_layout(self, style: str) -> str:
        return "LoRA on fused expert parameters has no tensor-parallel layout; shard experts with FSDP2 instead"

    # -- PEFT's target_parameters format: A (E * r, in), B (out, r * E), the module's first parameter innermost
    def peft_names(self) -> Iterator[tuple[str, str]]:
        """``(parameter name, PEFT's key prefix on the experts module)`` in PEFT's nesting."""
        depth = len(self.parameter_names)
        for i, name in enumerate(self.parameter_names):
            yield name, "base_layer." * (depth - 1 - i)

    def peft_state(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {}
        for name, inner in self.peft_names():
            a, b = self.A[name].detach(), self.B[name].detach()
            out[f"{prefix}.{inner}lora_A.weight"] = a.reshape(-1, a.shape[-1])
            out[f"{prefix}.{inner}lora_B.weight"] = b.permute(1, 2, 0).reshape(b.shape[1], -1)
        return out

    def load_peft_state(self, parts: dict[str, torch.Tensor],
                        shared: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state = {}
        for name, inner in self.peft_names():
            a, b = parts.get(f"{inner}lora_A.weight"), parts.get(f"{inner}lora_B.weight")
            shape_a, shape_b = self.A[name].shape, self.B[name].shape
            if a is None or b is None or a.numel() != shape_a.numel() or b.numel() != shape_b.numel():
                raise DeltaConfigError(
                    f"the PEFT adapter's factors for {name!r} ({inner}lora_A/lora_B) are missing or have"
                    f" {None if a is None else tuple(a.shape)}, {None if b is None else tuple(b.shape)}; this"
                    f" model needs {shape_a.numel() // shape_a[-1]} x {shape_a[-1]} and"
                    f" {shape_b[1]} x {shape_b[2] * shape_b[0]}")
            state[f"A.{name}"] = a.reshape(shape_a)
            state[f"B.{name}"] = b.reshape(shape_b[1], shape_b[2], shape_b[0]).permute(2, 0, 1)
        return state
