"""Deltas across processes: attach before sharding, FSDP2 sharding, delta-only FSDP2 checkpoints,
and an FSDP1 auto-wrap policy that gives delta modules units of their own.

With FSDP2 (Lightning's ``ModelParallelStrategy``) the backbone is built in
``configure_model``, after ``Callback.setup``. ``DeltaCallback`` then wraps ``configure_model``
(:class:`AttachAfterConfigureModel`): after the user's code builds the backbone it attaches the
deltas and, if the model is not sharded yet, calls :func:`shard`. A ``configure_model`` that
shards by itself should call :func:`shard` instead of ``fully_shard``.
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
    """Whether any parameter of ``module`` is a DTensor (FSDP2 / tensor parallel already applied)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def _delta_callbacks(module: nn.Module) -> list[Any]:
    from lightning_delta.callback import DeltaCallback

    trainer = getattr(module, "_trainer", None)
    return [c for c in getattr(trainer, "callbacks", ()) if isinstance(c, DeltaCallback)]


def shard(module: nn.Module, mesh: Any = None, *, reshard_after_forward: bool = True) -> None:
    """Attaches pending deltas, then applies FSDP2 ``fully_shard``: each delta module, each repeated
    block, then every backbone root.

    Delta modules get units of their own, so a bf16 block never shares an FSDP2 parameter group
    with fp32 delta tensors (FSDP2 wants one dtype per group), and frozen parameters get neither
    gradients nor optimizer state.

    Args:
        module: a LightningModule (its ``DeltaCallback`` deltas are attached first) or any module
            that already holds its deltas.
        mesh: the device mesh to shard over, e.g. ``self.device_mesh["data_parallel"]``.
        reshard_after_forward: passed to ``fully_shard``.
    """
    from torch.distributed.fsdp import fully_shard

    roots: list[nn.Module] = []
    for callback in _delta_callbacks(module):
        callback.attach(module)
        roots.append(module.get_submodule(callback.backbone_path(module)))
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    for d in iter_deltas(module):
        fully_shard(d.module, **kwargs)
    for root in dict.fromkeys(roots or [module]):
        for block in repeated_blocks(root):
            fully_shard(block, **kwargs)
        fully_shard(root, **kwargs)


class AttachAfterConfigureModel:
    """Stands in for a LightningModule's ``configure_model``: runs it, then attaches and shards.

    Installed by ``DeltaCallback.setup`` when the backbone does not exist yet. Lightning sees the
    original method through ``__wrapped__``, so it still counts as overridden.
    """

    def __init__(self, configure_model: Callable[[], None], callback: Any) -> None:
        self.__wrapped__ = configure_model
        self.callback = callback

    @classmethod
    def install(cls, pl_module: nn.Module, callback: Any) -> None:
        current = pl_module.configure_model
        if not isinstance(current, cls):
            pl_module.configure_model = cls(current, callback)

    def __call__(self) -> None:
        pl_module = self.__wrapped__.__self__
        self.__wrapped__()
        if not list(iter_deltas(pl_module)) and is_sharded(pl_module):
            raise DeltaConfigError(
                f"{type(pl_module).__name__}.configure_model sharded the model before DeltaCallback could attach"
                " its deltas. Call lightning_delta.distributed.shard(self, mesh) there instead of fully_shard"
                " (it attaches, then shards), or only build the model and let DeltaCallback shard it."
            )
        self.callback.attach(pl_module)
        strategy = pl_module.trainer.strategy
        if _is_model_parallel(strategy) and not is_sharded(pl_module):
            shard(pl_module, strategy.device_mesh["data_parallel"])


def _is_model_parallel(strategy: Any) -> bool:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(strategy, ModelParallelStrategy)


# -- FSDP2 checkpoints ---------------------------------------------------------------------------
def _full(value: Any) -> Any:
    """A DTensor gathered in full (every shard) on the CPU; other values unchanged."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        value = value.full_tensor()
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value


def _like(value: Any, reference: Any) -> Any:
    """``value`` (a full tensor) laid out like ``reference`` (a DTensor: this rank's shard of it)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(reference, DTensor) and isinstance(value, torch.Tensor) and value.shape == reference.shape:
        full = value.to(device=reference.device, dtype=reference.dtype)
        return distribute_tensor(full, reference.device_mesh, reference.placements, src_data_rank=None)
    return value


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
