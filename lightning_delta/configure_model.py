"""Attaching deltas after a LightningModule's ``configure_model`` builds the backbone, before sharding."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from lightning_delta.core import iter_deltas
from lightning_delta.distributed import distribute_deltas, is_sharded, shard
from lightning_delta.errors import DeltaConfigError


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
        if not list(iter_deltas(pl_module)) and has_fsdp2_units(pl_module):
            raise DeltaConfigError(
                f"{type(pl_module).__name__}.configure_model sharded the model before DeltaCallback could attach"
                " its deltas. Call lightning_delta.distributed.shard(self, mesh) there instead of fully_shard"
                " (it attaches, then shards), or only build the model and let DeltaCallback shard it."
            )
        self.callback.attach(pl_module)
        distribute_deltas(pl_module)  # deltas attached after a tensor-parallel plan: lay them out like it
        strategy = pl_module.trainer.strategy
        if isinstance(strategy, ModelParallelStrategy) and not is_sharded(pl_module):
            shard(pl_module, strategy.device_mesh["data_parallel"])


def has_fsdp2_units(module: nn.Module) -> bool:
    """Whether FSDP2 sharded ``module`` or a submodule (a tensor-parallel plan alone does not count)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())
