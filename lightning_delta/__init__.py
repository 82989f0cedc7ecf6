"""lightning_delta: delta tuning (LoRA, BitFit, ...) for PyTorch Lightning and any ``nn.Module``."""

__version__ = "0.1.0"

from lightning_delta.callback import DeltaCallback, find_backbone, trainable_parameters  # noqa: E402
from lightning_delta.checkpoint import DeltaCheckpointHooks, attach_from_checkpoint, load_delta  # noqa: E402
from lightning_delta.core import Delta, DeltaConfig  # noqa: E402
from lightning_delta.errors import (  # noqa: E402
    CheckpointReadError,
    DeltaConfigError,
    DeltaError,
    DeltaStateError,
    MergeError,
    TargetError,
    UnsupportedModuleError,
)
from lightning_delta.handle import DeltaModel, DeltaSummary, attach  # noqa: E402
from lightning_delta.methods import METHODS, make_config  # noqa: E402
from lightning_delta.methods.bitfit import BitFitConfig  # noqa: E402
from lightning_delta.methods.lora import LoraConfig  # noqa: E402
from lightning_delta.targets import resolve_targets  # noqa: E402

__all__ = [
    "METHODS",
    "BitFitConfig",
    "CheckpointReadError",
    "Delta",
    "DeltaCallback",
    "DeltaCheckpointHooks",
    "DeltaConfig",
    "DeltaConfigError",
    "DeltaError",
    "DeltaModel",
    "DeltaStateError",
    "DeltaSummary",
    "LoraConfig",
    "MergeError",
    "TargetError",
    "UnsupportedModuleError",
    "attach",
    "attach_from_checkpoint",
    "find_backbone",
    "load_delta",
    "make_config",
    "resolve_targets",
    "trainable_parameters",
]
