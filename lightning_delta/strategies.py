"""Lightning strategies whose checkpoints hold only deltas, where a callback hook cannot do it.

Lightning's ``ModelParallelStrategy`` (FSDP2) gathers, or shards to disk, every tensor of the
model in ``lightning_module_state_dict`` and loads a sharded checkpoint by every key of the
model, before any callback runs. :class:`DeltaModelParallelStrategy` replaces those steps;
:class:`DeltaDeepSpeedStrategy` does the same for DeepSpeed ZeRO, whose checkpoints are per-rank
engine shards with empty ZeRO-3 placeholders in the model's state dict.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy, Strategy
from typing_extensions import override

from lightning_delta.tensors import distributed_like, gathered
from lightning_delta.errors import DeltaStateError
from lightning_delta.state import check_fit, state_tensors


class _SingleFileCheckpoints:
    """Checkpoint I/O of the delta strategies: rank 0 writes one Lightning file, every rank reads it
    (weights only) and the strategy restores the optimizer from it."""

    #: the sharded format of the parent strategy, for the error on a directory
    sharded_format: str = ""

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        return True

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        Strategy.save_checkpoint(self, checkpoint, filepath, storage_options)  # rank 0 writes one file

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = self.broadcast(checkpoint_path)
        if Path(path).is_dir():
            parent = next(c for c in type(self).__mro__ if c.__module__.startswith("lightning.")).__name__
            raise ValueError(
                f"{path} is a directory ({self.sharded_format}); {type(self).__name__} reads the single-file"
                f" delta checkpoints it writes. Resume a sharded directory with Lightning's {parent}"
            )
        return self.checkpoint_io.load_checkpoint(path, weights_only=True if weights_only is None else weights_only)


class DeltaModelParallelStrategy(_SingleFileCheckpoints, ModelParallelStrategy):
    """``ModelParallelStrategy`` (FSDP2) that writes delta-only, single-file checkpoints.

    Each delta/trainable tensor is gathered in full (every shard; the frozen backbone is never
    gathered) with its optimizer state, and rank 0 writes one file. On load every rank reads the
    file and keeps its own shard, so a run resumes on another world size. Use it with
    ``DeltaCallback`` exactly like ``ModelParallelStrategy``.
    """

    sharded_format = "a distributed checkpoint"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.pop("save_distributed_checkpoint", False):
            raise ValueError(
                "DeltaModelParallelStrategy writes single-file delta checkpoints; drop save_distributed_checkpoint=True"
            )
        super().__init__(*args, save_distributed_checkpoint=False, **kwargs)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        # DeltaCheckpointHooks drop the frozen backbone's entries untouched: no communication for them.
        return {k: gathered(v) for k, v in self.lightning_module.state_dict().items()}

    @override
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        state = _unwrapped(optimizer).state_dict()
        return {"state": {i: {k: gathered(v) for k, v in s.items()} for i, s in state["state"].items()},
                "param_groups": state["param_groups"]}

    @override
    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        module = self.lightning_module
        tensors = state_tensors(module)
        state = checkpoint["state_dict"]
        module.load_state_dict({k: distributed_like(v, tensors.get(k)) for k, v in state.items()}, strict=strict)

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            converted = {i: {k: distributed_like(v, params[int(i)]) for k, v in s.items()}
                         for i, s in state["state"].items()}
            optimizer.load_state_dict({**state, "state": converted})


class DeltaDeepSpeedStrategy(_SingleFileCheckpoints, DeepSpeedStrategy):
    """``DeepSpeedStrategy`` (ZeRO stage 1-3) that writes delta-only, single-file checkpoints.

    DeepSpeed's own checkpoints are per-rank shards of the engine, and under ZeRO-3 the model's
    ``state_dict()`` holds empty placeholders. Here each trained tensor (deltas, modules trained
    whole) is assembled in full from DeepSpeed's fp32 master copy, with its optimizer state, and
    rank 0 writes one Lightning checkpoint; the frozen backbone is never gathered. Loading writes
    the values back into every rank's partition (``deepspeed.utils.safe_set_full_*``), so a run
    resumes on another world size, and ``load_delta`` / ``lightning-delta export`` read the file.

    Runs on GPUs as Lightning's strategy does, and on the CPU with DeepSpeed's CPU accelerator and
    the gloo backend (Lightning's own strategy refuses the CPU). One optimizer, as DeepSpeed.
    """

    sharded_format = "DeepSpeed's sharded format"

    @override
    def setup_environment(self) -> None:
        if isinstance(self.accelerator, CUDAAccelerator):
            return super().setup_environment()
        DDPStrategy.setup_environment(self)  # Lightning's CUDA-only check skipped: DeepSpeed runs on the CPU

    @override
    def setup_distributed(self) -> None:
        if self.root_device.type == "cuda":
            return super().setup_distributed()
        reset_seed()  # CPU devices have no index: Lightning's device-index check does not apply
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @contextmanager
    def _device_rank(self) -> Iterator[None]:
        """Lightning passes ``device_rank=root_device.index`` to ``deepspeed.initialize``: ``None`` on the CPU."""
        import deepspeed

        initialize = deepspeed.initialize

        def with_rank(*args: Any, **kwargs: Any) -> Any:
            namespace = kwargs.get("args")
            if namespace is not None and getattr(namespace, "device_rank", 0) is None:
                namespace.device_rank = self.local_rank
            return initialize(*args, **kwargs)

        deepspeed.initialize = with_rank
        try:
            yield
        finally:
            deepspeed.initialize = initialize

    @override
    def _setup_model_and_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        with self._device_rank():
            return super()._setup_model_and_optimizer(*args, **kwargs)

    @override
    def _initialize_deepspeed_inference(self, model: Any) -> None:
        with self._device_rank():
            super()._initialize_deepspeed_inference(model)

    # -- checkpoints: trained tensors in full, from the fp32 master copies ------------------------------
    def _trained(self) -> dict[str, Any]:
        """The lightning module's parameters that DeepSpeed's optimizer updates, by state-dict key."""
        return {k: p for k, p in self.lightning_module.named_parameters() if p.requires_grad}

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        # DeltaCheckpointHooks drop the frozen backbone's entries (ZeRO-3 placeholders) untouched
        state = self.lightning_module.state_dict()
        params = dict(self.lightning_module.named_parameters())
        for key in sorted(k for k in state if k in params):  # the same collectives in the same order on every rank
            state[key] = _deepspeed_full(params[key])
        return state

    @override
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        from deepspeed.utils import safe_get_full_optimizer_state

        inner = _inner_optimizer(optimizer)
        flat_state = next(iter(inner.state.values()), {})
        keys = sorted(k for k, v in flat_state.items() if torch.is_tensor(v) and v.dim() > 0)
        state = {name: {key: safe_get_full_optimizer_state(p, key).detach().cpu() for key in keys}
                 for name, p in sorted(self._trained().items())} if keys else {}  # none before the first step
        scalars = {k: v for k, v in flat_state.items() if k not in keys}
        groups = [{k: v for k, v in group.items() if k != "params"} for group in inner.param_groups]
        return {"deepspeed": {"state": state, "scalars": scalars}, "param_groups": groups}

    @override
    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        module = self.lightning_module
        state = checkpoint["state_dict"]
        tensors = state_tensors(module)
        # the checks of any delta checkpoint, against full shapes (ZeRO-3 records them beside its placeholders)
        shapes = {k: torch.empty(getattr(t, "ds_shape", t.shape), device="meta") for k, t in tensors.items()}
        check_fit(state, shapes, set(module.state_dict()), strict=strict, allow_frozen=False)
        for key in sorted(state):  # collectives in the same order on every rank
            target, value = tensors[key], state[key]
            with _gathered(target), torch.no_grad():  # the module's copy (ZeRO-3: each rank keeps its partition)
                target.copy_(value)
            if _has_master(target):  # and the optimizer's fp32 master copy, which the next step starts from
                safe_set_full_fp32_param(target, value.to(target.device, torch.float32))

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        for optimizer, saved in zip(self.optimizers, checkpoint["optimizer_states"]):
            if "deepspeed" not in saved:
                raise DeltaStateError("the checkpoint's optimizer state was not written by DeltaDeepSpeedStrategy;"
                                      " resume it with the strategy that wrote it")
            inner, values = _inner_optimizer(optimizer), saved["deepspeed"]
            for group, hyper in zip(inner.param_groups, saved["param_groups"]):
                group.update(hyper)
            if not values["state"]:
                continue  # saved before the first step
            keys = next(iter(values["state"].values())).keys()
            for flat in _flat_partitions(optimizer):  # state entries to write into, as a first step would make
                entry = inner.state[flat]
                entry.update({k: torch.zeros_like(flat) for k in keys if k not in entry})
                entry.update({k: v.clone() if torch.is_tensor(v) else v for k, v in values["scalars"].items()})
            params = self._trained()
            for name in sorted(values["state"]):
                for key, value in values["state"][name].items():
                    safe_set_full_optimizer_state(params[name], value.to(params[name].device), key)


def _unwrapped(optimizer: Any) -> Any:
    return optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


def _inner_optimizer(optimizer: Any) -> Any:
    """The torch optimizer DeepSpeed drives (its state is keyed by flat fp32 partitions)."""
    optimizer = _unwrapped(optimizer)
    return getattr(optimizer, "optimizer", optimizer)


def _flat_partitions(optimizer: Any) -> list[torch.Tensor]:
    """This rank's flat fp32 partitions, which key the inner optimizer's state (ZeRO-3 hands them to the
    inner optimizer only while it steps; ZeRO-1/2 keep them in its param groups)."""
    optimizer = _unwrapped(optimizer)
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        if getattr(optimizer, name, None) is not None:
            return list(getattr(optimizer, name))
    return [p for group in _inner_optimizer(optimizer).param_groups for p in group["params"]]


def _has_master(param: torch.Tensor) -> bool:
    """Whether DeepSpeed's optimizer holds an fp32 master copy of ``param`` (ZeRO-3, or ZeRO-1/2)."""
    return getattr(param, "_z3_optimizer", None) is not None or hasattr(param, "_hp_mapping")


def _gathered(param: torch.Tensor) -> Any:
    """ZeRO-3: the parameter in full for the moment (written back from rank 0's values); else nothing to do."""
    if not hasattr(param, "ds_id"):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=0)


def _deepspeed_full(param: torch.nn.Parameter) -> torch.Tensor:
    """A parameter's full value on the CPU: the fp32 master copy where DeepSpeed's optimizer holds one,
    else the parameter, gathered for the moment under ZeRO-3."""
    from deepspeed.utils import safe_get_full_fp32_param

    if _has_master(param):
        return safe_get_full_fp32_param(param).detach().cpu()
    with _gathered(param):
        return param.detach().cpu().clone()
