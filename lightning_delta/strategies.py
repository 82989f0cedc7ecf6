"""Lightning strategies whose checkpoints hold only deltas, where a callback hook cannot do it.

Lightning's ``ModelParallelStrategy`` (FSDP2) gathers, or shards to disk, every tensor of the
model in ``lightning_module_state_dict`` and loads a sharded checkpoint by every key of the
model, before any callback runs. :class:`DeltaModelParallelStrategy` replaces those steps.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from typing_extensions import override

from lightning_delta.distributed import _full, _like
from lightning_delta.state import state_tensors


class DeltaModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` (FSDP2) that writes delta-only, single-file checkpoints.

    Each delta/trainable tensor is gathered in full (every shard; the frozen backbone is never
    gathered) with its optimizer state, and rank 0 writes one file. On load every rank reads the
    file and keeps its own shard, so a run resumes on another world size. Use it with
    ``DeltaCallback`` exactly like ``ModelParallelStrategy``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.pop("save_distributed_checkpoint", False):
            raise ValueError(
                "DeltaModelParallelStrategy writes single-file delta checkpoints; drop save_distributed_checkpoint=True"
            )
        super().__init__(*args, save_distributed_checkpoint=False, **kwargs)

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        return True

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        # DeltaCheckpointHooks drop the frozen backbone's entries untouched: no communication for them.
        return {k: _full(v) for k, v in self.lightning_module.state_dict().items()}

    @override
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        state = optimizer.state_dict()
        return {"state": {i: {k: _full(v) for k, v in s.items()} for i, s in state["state"].items()},
                "param_groups": state["param_groups"]}

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        Strategy.save_checkpoint(self, checkpoint, filepath, storage_options)  # rank 0 writes one file

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = self.broadcast(checkpoint_path)
        return self.checkpoint_io.load_checkpoint(path, weights_only=True if weights_only is None else weights_only)

    @override
    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        module = self.lightning_module
        tensors = state_tensors(module)
        state = checkpoint["state_dict"]
        module.load_state_dict({k: _like(v, tensors.get(k)) for k, v in state.items()}, strict=strict)

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            converted = {i: {k: _like(v, params[int(i)]) for k, v in s.items()} for i, s in state["state"].items()}
            optimizer.load_state_dict({**state, "state": converted})
