"""The method registry: one line per method, mapping its name to its config class."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

from lightning_delta.core import DeltaConfig
from lightning_delta.errors import DeltaConfigError
from lightning_delta.methods.adalora import AdaLoraConfig
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

METHODS: dict[str, type[DeltaConfig]] = {
    config.method: config
    for config in (LoraConfig, DoraConfig, IA3Config, BitFitConfig, LayerNormConfig, AdapterConfig,
                   ParallelAdapterConfig, LowRankAdapterConfig, CompacterConfig, PromptConfig,
                   PrefixConfig, NewTokensConfig, PeftDeltaConfig, VeraConfig, LohaConfig, LokrConfig, OftConfig,
                   AdaLoraConfig)
}


def peft_reader(settings: Mapping[str, Any]) -> type[DeltaConfig] | None:
    """The registered method that reads a PEFT adapter with these settings (``adapter_config.json``; LoRA and
    DoRA share ``peft_type`` "LORA", ``use_dora`` tells them apart), or ``None``: the PEFT backend's job."""
    return next((cls for cls in METHODS.values() if cls.reads_peft(dict(settings))), None)


def default_lr(cls: type[DeltaConfig]) -> float | None:
    """The default of a method config's ``lr``: the method's recommended rate (``None`` for the PEFT backend)."""
    return {f.name: f.default for f in dataclasses.fields(cls)}["lr"]


def make_config(method: str | DeltaConfig, **kwargs: Any) -> DeltaConfig:
    """A config from a method name and keyword hyper-parameters, or a copy of a given config.

    Raises:
        DeltaConfigError: unknown method, unknown hyper-parameter or out-of-range value.
    """
    if isinstance(method, DeltaConfig):
        return dataclasses.replace(method, **kwargs) if kwargs else method
    if not isinstance(method, str) or method.lower() not in METHODS:
        close = difflib.get_close_matches(str(method).lower(), METHODS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise DeltaConfigError(
            f"unknown delta method {method!r}; {hint}known methods: {', '.join(sorted(METHODS))}, or a config such"
            " as LoraConfig(r=8) (YAML: {class_path: lightning_delta.LoraConfig, init_args: {r: 8}})"
        )
    cls = METHODS[method.lower()]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DeltaConfigError(
            f"{cls.method} has no hyper-parameter {', '.join(map(repr, unknown))}{hint};"
            f" valid ones: {', '.join(sorted(known))}"
        )
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any]) -> DeltaConfig:
    """Inverse of :meth:`DeltaConfig.to_dict`."""
    data = dict(data)
    return make_config(data.pop("method", None), **data)
