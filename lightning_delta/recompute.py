"""Activation (gradient) checkpointing of a frozen backbone's blocks, safe for every delta.

Each selected block's ``forward`` is replaced, on the instance, by :class:`CheckpointedForward`,
which runs it under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``: activations
inside the block are dropped and recomputed in backward. Parameter and module names do not
change (unlike ``checkpoint_wrapper``), so delta checkpoints are unaffected, and deltas inside a
block (LoRA, adapters, ...) are recomputed with it. Non-reentrant checkpointing needs no input
that requires grad, which a frozen backbone would not provide; prefix caches built for
training store nothing, so a recomputed block sees what it saw the first time.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_delta.distributed import repeated_blocks
from lightning_delta.errors import DeltaConfigError


_CACHE_FLAG = "_lightning_delta_cache_configs"  #: configs whose use_cache was turned off


class CheckpointedForward:
    """A block's forward run under non-reentrant checkpointing while the module is training."""

    def __init__(self, module: nn.Module) -> None:
        self.__wrapped__ = module.forward
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not (self.module.training and torch.is_grad_enabled()):
            return self.__wrapped__(*args, **kwargs)
        return checkpoint(self.__wrapped__, *args, use_reentrant=False, **kwargs)


def enable_checkpointing(
    model: nn.Module,
    every_n_layers: int = 1,
    block_types: Iterable[type[nn.Module]] | None = None,
    reentrant: bool = False,
) -> list[nn.Module]:
    """Checkpoints every ``every_n_layers``-th repeated block of ``model`` (idempotent).

    Args:
        model: the backbone.
        every_n_layers: checkpoint blocks 0, n, 2n, ... (1: every block).
        block_types: classes of the blocks; default: the model's repeated layers
            (:func:`~lightning_delta.distributed.repeated_blocks`).
        reentrant: must stay ``False``: reentrant checkpointing gives parameters inside a block no
            gradient unless an input of the block requires grad, which a frozen backbone's hidden
            states do not.

    Returns:
        The checkpointed blocks.

    Raises:
        DeltaConfigError: ``reentrant=True``, ``every_n_layers < 1``, or no blocks found.
    """
    if reentrant:
        raise DeltaConfigError(
            "reentrant=True: reentrant checkpointing drops the gradients of deltas inside a block when the block's"
            " inputs do not require grad, as with a frozen backbone. Use reentrant=False (the default), which"
            " recomputes the same way without that restriction"
        )
    if every_n_layers < 1:
        raise DeltaConfigError(f"every_n_layers={every_n_layers} must be at least 1")
    types = tuple(block_types or ())
    blocks = [m for m in model.modules() if isinstance(m, types)] if types else repeated_blocks(model)
    if not blocks:
        raise DeltaConfigError(
            f"found no repeated blocks in {type(model).__name__} to checkpoint; pass block_types=[YourBlock]")
    chosen = blocks[::every_n_layers]
    for block in chosen:
        if not isinstance(block.__dict__.get("forward"), CheckpointedForward):
            block.forward = CheckpointedForward(block)
    # A block that fills a key/value cache in forward would read it back when recomputed (T5's
    # cross-attention): training forwards need no cache. generate() still asks for one explicitly.
    configs = {id(c): c for m in model.modules() if getattr(c := getattr(m, "config", None), "use_cache", False)}
    for config in configs.values():
        config.use_cache = False
    model.__dict__.setdefault(_CACHE_FLAG, []).extend(configs.values())
    return chosen


def disable_checkpointing(model: nn.Module) -> None:
    """Undoes :func:`enable_checkpointing`."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), CheckpointedForward):
            del module.forward
    for config in model.__dict__.pop(_CACHE_FLAG, []):
        config.use_cache = True
