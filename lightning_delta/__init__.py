"""lightning_delta: delta tuning (LoRA, BitFit, ...) for PyTorch Lightning and any ``nn.Module``.

The engine (``attach``, ``DeltaModel``, methods, state) needs only torch; the Lightning
callback is imported on first use, so ``import lightning_delta`` does not import Lightning.
"""

from typing import Any

from lightning_delta.checkpoint import (
    DeltaCheckpointHooks,
    attach_from_checkpoint,
    load_delta,
    save_delta,
)
from lightning_delta.core import Delta, DeltaConfig
from lightning_delta.errors import (
    CheckpointReadError,
    DeltaConfigError,
    DeltaError,
    DeltaStateError,
    MergeError,
    ModelLoadError,
    NonFiniteError,
    TargetError,
    UnsupportedModuleError,
)
from lightning_delta.peft_format import export_peft, import_peft
from lightning_delta.handle import DeltaModel, DeltaSummary, attach, trainable_parameters
from lightning_delta.methods import METHODS, make_config
from lightning_delta.methods.adalora import AdaLoraConfig, RankAllocator
from lightning_delta.methods.adapter import AdapterConfig
from lightning_delta.methods.bitfit import BitFitConfig
from lightning_delta.methods.compacter import CompacterConfig
from lightning_delta.methods.dora import DoraConfig
from lightning_delta.methods.ia3 import IA3Config
from lightning_delta.methods.layernorm import LayerNormConfig
from lightning_delta.methods.loha import LohaConfig
from lightning_delta.methods.lokr import LokrConfig
from lightning_delta.methods.lora import LoraConfig
from lightning_delta.methods.low_rank_adapter import LowRankAdapterConfig
from lightning_delta.methods.new_tokens import NewTokensConfig
from lightning_delta.methods.oft import OftConfig
from lightning_delta.methods.parallel_adapter import ParallelAdapterConfig
from lightning_delta.methods.peft_backend import PeftDeltaConfig
from lightning_delta.methods.prefix import PrefixConfig
from lightning_delta.methods.prompt import PromptConfig
from lightning_delta.methods.vera import VeraConfig
from lightning_delta.optim import param_groups
from lightning_delta.targets import resolve_targets
from lightning_delta.version import __version__ as __version__

_LIGHTNING_NAMES = {"DeltaCallback": "callback", "find_backbone": "callback",
                    "DeltaModelParallelStrategy": "strategies", "DeltaDeepSpeedStrategy": "strategies"}


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING_NAMES:
        import importlib

        return getattr(importlib.import_module(f"lightning_delta.{_LIGHTNING_NAMES[name]}"), name)
    raise AttributeError(f"module 'lightning_delta' has no attribute {name!r}")


__all__ = [
    "METHODS",
    "AdaLoraConfig",
    "AdapterConfig",
    "BitFitConfig",
    "CheckpointReadError",
    "ModelLoadError",
    "NonFiniteError",
    "CompacterConfig",
    "Delta",
    "DeltaCallback",
    "DeltaCheckpointHooks",
    "DeltaConfig",
    "DeltaConfigError",
    "DeltaDeepSpeedStrategy",
    "DeltaError",
    "DeltaModel",
    "DeltaModelParallelStrategy",
    "DeltaStateError",
    "DeltaSummary",
    "DoraConfig",
    "IA3Config",
    "LayerNormConfig",
    "LohaConfig",
    "LokrConfig",
    "LoraConfig",
    "LowRankAdapterConfig",
    "MergeError",
    "NewTokensConfig",
    "OftConfig",
    "ParallelAdapterConfig",
    "PeftDeltaConfig",
    "PrefixConfig",
    "PromptConfig",
    "RankAllocator",
    "TargetError",
    "UnsupportedModuleError",
    "VeraConfig",
    "attach",
    "attach_from_checkpoint",
    "export_peft",
    "find_backbone",
    "import_peft",
    "load_delta",
    "make_config",
    "param_groups",
    "resolve_targets",
    "save_delta",
    "trainable_parameters",
]
