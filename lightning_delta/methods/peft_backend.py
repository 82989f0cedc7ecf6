"""Any PEFT method, injected with ``peft.inject_adapter_in_model`` and handled like a native delta.

``attach(model, peft_config=peft.LoHaConfig(...))`` / ``DeltaCallback(peft_config=...)`` record the
PEFT config (as a JSON-serialisable dict) in a :class:`PeftDeltaConfig`, whose delta module
``peft`` (no tensors of its own) injects the adapter into the model and removes it on detach.
The adapter's tensors (PEFT's ``adapter_layer_names``, e.g. ``lora_A``) count as delta tensors:
frozen backbone, delta-only checkpoints, resume and ``load_delta`` work as for native methods.

One exception, as PEFT wraps its targets: the wrapped layers' backbone tensors are renamed
(``query.weight`` -> ``query.base_layer.weight``), so a stock state dict no longer loads into the
injected model by name, and fingerprints recorded with and without PEFT differ on those names.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_delta.core import Delta, WholeModelConfig
from lightning_delta.errors import DeltaConfigError


def _require_peft() -> Any:
    missing = DeltaConfigError("this needs the PEFT library, which is not installed:"
                               ' pip install "lightning-delta[peft]"')
    if importlib.util.find_spec("peft") is None:
        raise missing
    try:
        import peft
    except ImportError as err:
        raise missing from err
    return peft


def peft_adapter_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(path, module)`` of every adapter part PEFT injected (``lora_A``, ``ia3_l``, ...)."""
    for path, module in model.named_modules():
        names = getattr(module, "adapter_layer_names", None)
        if names and hasattr(module, "base_layer"):
            for name in names:
                part = getattr(module, name, None)
                if isinstance(part, (nn.ModuleDict, nn.ParameterDict)) and len(part):
                    yield f"{path}.{name}" if path else name, part


@dataclass
class PeftDeltaConfig(WholeModelConfig):
    """A PEFT config carried as a delta spec.

    Args:
        peft: the PEFT config as a dict (``peft_config.to_dict()``), e.g.
            ``{"peft_type": "LORA", "r": 8, "target_modules": ["query", "value"]}``.
        lr: peak learning rate; ``None``: the rate of the native method of the same PEFT type
            (:func:`~lightning_delta.optim.method_lr`).
    """

    method = "peft"
    switchable = False  # PEFT switches its own adapters
    supported_types = "any model PEFT can inject into (targets come from the PEFT config's target_modules)"

    peft: dict[str, Any] = field(default_factory=dict)
    lr: float | None = field(default=None, kw_only=True)

    def validate(self) -> None:
        peft = _require_peft()
        if not self.peft.get("peft_type"):
            raise DeltaConfigError(
                f"peft={self.peft!r} has no peft_type; pass peft_config=peft.LoraConfig(...) or its to_dict()")
        self.peft = {k: (sorted(v) if isinstance(v, set) else v) for k, v in self.peft.items()}
        try:
            peft.get_peft_config(dict(self.peft))
        except Exception as err:  # PEFT's own validation: report it with the value
            raise DeltaConfigError(f"PEFT rejects peft={self.peft!r}: {err}") from err

    @classmethod
    def from_peft(cls, peft_config: Any, **kwargs: Any) -> PeftDeltaConfig:
        """From a ``peft.PeftConfig`` object."""
        data = {k: v for k, v in peft_config.to_dict().items() if not k.startswith("_")}
        data = {k: (v.value if hasattr(v, "value") else v) for k, v in data.items()}
        return cls(peft=data, **kwargs)

    def supports(self, module: nn.Module) -> bool:
        return True

    def peft_config(self, deltas: list, **common: Any) -> Any:
        """The PEFT config it came from (an adapter imported through PEFT exports back to its own format)."""
        peft = _require_peft()
        return peft.get_peft_config({**self.peft, **common, "inference_mode": True})

    def build(self, module: nn.Module, seed: int, path: str = "") -> PeftDelta:
        delta = PeftDelta(self, module)
        delta.init_seed = seed
        return delta


class PeftDelta(Delta):
    """The injected PEFT adapter (its tensors live in PEFT's layers): injects on attach, unwraps on detach."""

    _target: tuple[nn.Module, ...] = ()  # the model it injected into, once attached

    def hook_into(self, target: nn.Module) -> None:
        peft = _require_peft()
        with torch.random.fork_rng(devices=[]):  # PEFT draws from the global RNG: seed it, then restore it
            torch.manual_seed(self.init_seed)
            peft.inject_adapter_in_model(peft.get_peft_config(dict(self.config.peft)), target,
                                         adapter_name=self.adapter_name)
        # the model, whose PEFT layers hold this delta's tensors (in a tuple: not a registered submodule,
        # and deep-copied together with the model)
        self._target = (target,)

    @property
    def adapter_name(self) -> str:
        return self.config.name or "default"

    def peft_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """The injected adapter's tensors under PEFT's file names (``<module>.lora_A.weight``)."""
        (target,) = self._target
        out = {}
        for path, part in peft_adapter_modules(target):
            if self.adapter_name in part:
                entry = part[self.adapter_name]
                state = entry.state_dict() if isinstance(entry, nn.Module) else {"": entry}
                for key, value in state.items():
                    out[".".join(filter(None, (prefix.rstrip("."), path, key)))] = value.detach()
        return out

    def parts_elsewhere(self) -> list[str]:
        return [f"{path}.{self.adapter_name}" for target in self._target
                for path, part in peft_adapter_modules(target) if self.adapter_name in part]

    def unhook_from(self, target: nn.Module) -> None:
        self._target = ()
        for path, module in list(target.named_modules()):
            if getattr(module, "adapter_layer_names", None) and hasattr(module, "base_layer") and path:
                parent_path, _, child = path.rpartition(".")
                target.get_submodule(parent_path).add_module(child, module.get_base_layer())

    def forward(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:  # pragma: no cover - no hook
        raise NotImplementedError("PEFT's own layers apply the adapter")
