"""Deltas across processes: FSDP2 sharding (each delta a unit of its own), tensor parallelism with LoRA on
column- and row-parallel linears, and an FSDP1 auto-wrap policy that gives delta modules units of their own.

With FSDP2 (Lightning's ``ModelParallelStrategy``) the backbone is built in ``configure_model``, after
``Callback.setup``; ``DeltaCallback`` attaches right after it
(:mod:`lightning_delta.configure_model`) and, if the model is not sharded yet, calls :func:`shard`. A
``configure_model`` that shards by itself should call :func:`shard` instead of ``fully_shard``; one that
applies a tensor parallel plan should call :func:`tensor_parallel` instead of ``parallelize_module``.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lightning_delta.core import Delta, iter_deltas
from lightning_delta.errors import DeltaConfigError
from lightning_delta.tensors import is_partitioned


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated layers: the most repeated of transformers' ``_no_split_modules``
    classes, else the children of the largest ``nn.ModuleList`` whose children share one class."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names and not isinstance(m, Delta)]
    if blocks:  # keep the most repeated classes (BertLayer, not BertEmbeddings)
        counts = Counter(type(m) for m in blocks)
        return [m for m in blocks if counts[type(m)] == max(counts.values())]
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1
             and len({type(c) for c in m}) == 1]
    return list(max(lists, key=len)) if lists else []


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` lives on several ranks (FSDP2 / tensor parallel already applied)."""
    return any(is_partitioned(p) for p in module.parameters())


def _attachers(module: nn.Module) -> list[Any]:
    """The callbacks of ``module``'s Trainer that attach deltas before sharding (``DeltaCallback``)."""
    trainer = getattr(module, "_trainer", None)
    return [c for c in getattr(trainer, "callbacks", ()) if callable(getattr(c, "attach_before_sharding", None))]


def shard(module: nn.Module, mesh: Any = None, *, reshard_after_forward: bool = True) -> None:
    """Attaches pending deltas, then applies FSDP2 ``fully_shard``: each delta module, each repeated
    block, then every backbone root.

    Delta modules get units of their own, so a bf16 block never shares an FSDP2 parameter group
    with fp32 delta tensors (FSDP2 wants one dtype per group), and frozen parameters get neither
    gradients nor optimizer state.

    Args:
        module: a LightningModule (the deltas of its Trainer's ``DeltaCallback`` are attached first: any
            callback with an ``attach_before_sharding(module) -> backbone`` method) or any module that
            already holds its deltas.
        mesh: the device mesh to shard over, e.g. ``self.device_mesh["data_parallel"]``.
        reshard_after_forward: passed to ``fully_shard``.
    """
    from torch.distributed.fsdp import fully_shard

    tp = [name for name, m in module.named_modules() if getattr(m, "_distribute_module_applied", False)]
    if tp:
        raise DeltaConfigError(
            f"{type(module).__name__} is tensor parallel already ({tp[0]!r}, ...); FSDP2 on top of tensor"
            " parallelism (a 2-D mesh) is not supported. Use data_parallel_size=1 with tensor_parallel(...),"
            " or fully_shard only (shard(...))")
    roots: list[nn.Module] = []
    for callback in _attachers(module):
        roots.append(callback.attach_before_sharding(module))
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    for d in iter_deltas(module):
        fully_shard(d.module, **kwargs)
    for root in dict.fromkeys(roots or [module]):
        for block in repeated_blocks(root):
            fully_shard(block, **kwargs)
        fully_shard(root, **kwargs)


# -- tensor parallelism --------------------------------------------------------------------------
def tensor_parallel(module: nn.Module, mesh: Any, plan: dict[str, Any]) -> nn.Module:
    """Attaches pending deltas, applies a tensor-parallel ``plan`` (torch's ``parallelize_module``),
    then lays out each LoRA factor to match its target (:func:`distribute_deltas`).

    Use it in ``configure_model`` instead of ``parallelize_module``, e.g. with Lightning's
    ``ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=N)``::

        plan = {"model.model.layers.*.self_attn.q_proj": ColwiseParallel(), ...,
                "model.model.layers.*.mlp.down_proj": RowwiseParallel()}
        tensor_parallel(self, self.device_mesh["tensor_parallel"], plan)

    Delta modules are taken out of their targets while the plan is applied (torch's styles would
    otherwise shard or replicate their tensors like the backbone's; ``ColwiseParallel`` fails on
    them with ``KeyError: 'parameter name can't contain "."'``), then put back. Deltas may also be
    attached after ``parallelize_module``; then call :func:`distribute_deltas` (``DeltaCallback``
    does, right after ``configure_model``).

    Args:
        module: a LightningModule (its ``DeltaCallback`` deltas are attached first) or any module
            that already holds its deltas; the plan's names are relative to it.
        mesh: a 1-D device mesh, e.g. ``self.device_mesh["tensor_parallel"]``.
        plan: module name (``*`` wildcards allowed) -> ``ColwiseParallel()`` / ``RowwiseParallel()`` / ...

    Raises:
        DeltaConfigError: a delta on a module the plan parallelized that is not LoRA (``init``
            ``"default"`` / ``"gaussian"``, ``dropout=0``) on an ``nn.Linear`` with ``ColwiseParallel``
            or ``RowwiseParallel``; the plan has been applied by then.
    """
    from torch.distributed.tensor.parallel import parallelize_module

    for callback in _attachers(module):
        callback.attach_before_sharding(module)
    if getattr(mesh, "ndim", 1) != 1:
        raise DeltaConfigError(f"tensor_parallel needs a 1-D mesh, got {mesh.ndim} dimensions:"
                               " pass device_mesh['tensor_parallel']")
    removed: list[tuple[nn.Module, dict[str, nn.Module]]] = []
    for parent in list(module.modules()):
        if any(isinstance(child, Delta) for child in parent._modules.values()):
            removed.append((parent, dict(parent._modules)))
            for key in [k for k, child in parent._modules.items() if isinstance(child, Delta)]:
                del parent._modules[key]
    try:
        parallelize_module(module, mesh, plan)
    finally:
        for parent, children in removed:
            parent._modules.clear()
            parent._modules.update(children)
    distribute_deltas(module)
    return module



def _tp_ancestor(module: nn.Module, target_path: str) -> str | None:
    """The name of the nearest module at or above ``target_path`` that a tensor-parallel style was applied to."""
    parts = target_path.split(".") if target_path else []
    for n in range(len(parts), -1, -1):
        path = ".".join(parts[:n])
        if getattr(module.get_submodule(path), "_distribute_module_applied", False):
            return path
    return None


def distribute_deltas(module: nn.Module) -> None:
    """Lays out the factors of each LoRA whose target a tensor-parallel plan parallelized, and makes
    its forward hook run before the plan's output hook. A no-op for a model without a plan.

    Our LoRA is a forward hook on its target that reads the target's input and adds to its output.
    Moved before the plan's output hook it sees both as DTensors: for a column-parallel target
    (weight ``Shard(0)``) the input replicated and the output sharded over features, so ``A`` is
    replicated and ``B`` is ``Shard(0)`` (each rank adds its own output slice); for a row-parallel
    target (weight ``Shard(1)``) the input sharded over features and the output a partial sum, so
    ``A`` is ``Shard(1)`` and ``B`` replicated, and the update joins the partial sum before the
    plan's all-reduce. The replicated factor's gradient comes out of backward as a partial sum
    (each rank's share); a post-accumulate-grad hook all-reduces it, so every rank steps the same
    full gradient. Calling it again changes nothing.

    Raises :class:`DeltaConfigError` for any other delta on a parallelized module, naming it and the fix.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    for d in iter_deltas(module):
        where = _tp_ancestor(module, d.target_path)
        if where is None:
            continue
        target = module.get_submodule(d.target_path)
        fix = (f" Leave {where!r} out of the plan, or {d.target_path!r} out of the delta's targets"
               f" (exclude=[{d.target_path.rsplit('.', 1)[-1]!r}]).")
        if where != d.target_path:
            raise DeltaConfigError(
                f"delta {d.path!r}: its target sits inside {where!r}, which the tensor-parallel plan parallelized"
                " as a whole; deltas support plan entries on their target linear itself." + fix)
        weight = getattr(target, "weight", None)
        style = None
        if isinstance(weight, DTensor) and type(target) is nn.Linear and weight.device_mesh.ndim == 1:
            style = {Shard(0): "ColwiseParallel", Shard(1): "RowwiseParallel"}.get(weight.placements[0])
        if style is None:
            placements = weight.placements if isinstance(weight, DTensor) else None
            raise DeltaConfigError(
                f"delta {d.path!r}: its target {d.target_path!r} ({type(target).__name__}, weight placements"
                f" {placements}) is parallelized in a way deltas do not support; supported are nn.Linear targets"
                " with ColwiseParallel() or RowwiseParallel() on a 1-D mesh." + fix)
        layout = d.module.tensor_parallel_layout(style)
        if isinstance(layout, str):
            raise DeltaConfigError(f"delta {d.path!r}: {d.module.config.method!r} cannot run on the {style} target"
                                   f" {d.target_path!r}; {layout}." + fix)
        mesh = weight.device_mesh
        for name, dim in layout.items():
            param = getattr(d.module, name)
            placements = [Replicate() if dim == "replicate" else Shard(dim)]
            if isinstance(param, DTensor):
                if param.device_mesh == mesh and list(param.placements) == placements:
                    continue
                value = param.redistribute(mesh, placements) if param.device_mesh == mesh else None
                if value is None:
                    raise DeltaConfigError(f"delta {d.path!r}: {name} lives on another device mesh than"
                                           f" {d.target_path!r}'s weight; attach the delta before sharding")
            else:
                value = distribute_tensor(param.detach().to(weight.device), mesh, placements)
            param = nn.Parameter(value.detach(), requires_grad=param.requires_grad)
            if dim == "replicate":
                # its gradient arrives as a partial sum over the ranks: reduce it, or the optimizer steps
                # each rank's copy with its own part
                param.register_post_accumulate_grad_hook(_grad_like_param)
            d.module.register_parameter(name, param)
        _hooks_first(d.module, target)


def _grad_like_param(param: torch.Tensor) -> None:
    """Lays out a DTensor parameter's gradient like the parameter (a ``Partial`` sum to ``Replicate``)."""
    grad = param.grad
    if grad is not None and tuple(grad.placements) != tuple(param.placements):
        param.grad = grad.redistribute(param.device_mesh, param.placements)


def _hooks_first(delta: Delta, target: nn.Module) -> None:
    """Moves ``delta``'s forward hooks on ``target`` ahead of the others (the plan's output hook)."""
    ours = [k for k, hook in target._forward_hooks.items() if getattr(hook, "__self__", None) is delta]
    for key in reversed(ours):
        target._forward_hooks.move_to_end(key, last=False)


# -- FSDP1 -------------------------------------------------------------------------------------
def delta_wrap_policy(block_types: Iterable[type[nn.Module]] = ()) -> Callable[..., bool]:
    """An FSDP1 auto-wrap policy: each delta module, each module whose own parameters are all
    trainable (e.g. a ``trainable=["classifier"]`` head) and each block is a unit of its own.

    FSDP1 flattens a unit's parameters into one flat parameter that needs one dtype and one
    ``requires_grad``; with trained tensors in units of their own they never share a flat parameter
    with frozen (possibly bf16) backbone tensors, so ``use_orig_params=False`` works and frozen
    flat parameters carry no gradient.

    Args:
        block_types: classes of the repeated blocks to wrap too (e.g. ``LlamaDecoderLayer``).
    """
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    return functools.partial(lambda_auto_wrap_policy, lambda_fn=functools.partial(_is_unit, tuple(block_types)))


def _is_unit(block_types: tuple[type[nn.Module], ...], module: nn.Module) -> bool:
    own = list(module.parameters(recurse=False))
    trained = bool(own) and all(p.requires_grad for p in own)
    return isinstance(module, Delta) or trained or bool(block_types) and isinstance(module, block_types)


def flat_groups(model: nn.Module, wraps: Callable[[nn.Module], bool]) -> dict[str, list[torch.nn.Parameter]]:
    """The parameters each FSDP1 unit would flatten together if ``wraps`` chose the units: every
    parameter belongs to its nearest wrapped ancestor (the root unit holds the rest)."""
    groups: dict[str, list[nn.Parameter]] = {}

    def visit(prefix: str, module: nn.Module, unit: str) -> None:
        if prefix and wraps(module):
            unit = prefix
        groups.setdefault(unit, []).extend(module.parameters(recurse=False))
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child, unit)

    visit("", model, "")
    return {k: v for k, v in groups.items() if v}


def install_wrap_policy(strategy: Any, model: nn.Module) -> None:
    """Gives a Lightning ``FSDPStrategy`` (FSDP1) :func:`delta_wrap_policy` for ``model``'s blocks,
    or-ed with the policy the user gave, so delta modules always get units of their own."""
    from torch.distributed.fsdp.wrap import _or_policy

    ours = delta_wrap_policy({type(b) for b in repeated_blocks(model)})
    given = strategy.kwargs.get("auto_wrap_policy")
    if getattr(given, "func", None) is _or_policy:
        return  # installed already (setup runs for every stage)
    strategy.kwargs["auto_wrap_policy"] = ours if given is None else functools.partial(_or_policy,
                                                                                       policies=[given, ours])
