"""How a method config converts to and from PEFT's adapter format: the hooks each method overrides."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from lightning_delta.errors import DeltaConfigError


class PeftConversion:
    """PEFT's side of :class:`~lightning_delta.core.DeltaConfig`: a method that PEFT also has overrides
    :meth:`peft_config` (export), sets ``peft_type`` and overrides :meth:`from_peft` (import)."""

    method: ClassVar[str] = ""

    def peft_config(self, deltas: list[Any], **common: Any) -> Any:
        """This delta as a ``peft.PeftConfig`` for :func:`~lightning_delta.peft_format.export_peft`.

        Args:
            deltas: the delta's modules in the model.
            **common: ``task_type`` and ``modules_to_save``, for every PEFT config.

        Raises:
            DeltaConfigError: PEFT has no equivalent of this method.
        """
        raise DeltaConfigError(f"PEFT has no equivalent of {self.method!r}")

    #: PEFT's ``peft_type`` that :func:`~lightning_delta.peft_format.import_peft` reads as this method
    peft_type: ClassVar[str | None] = None
    #: where PEFT's adapter files put modules trained whole (``modules_to_save``, a classifier head)
    peft_module_prefix: ClassVar[str] = "base_model.model."

    @classmethod
    def reads_peft(cls, settings: dict[str, Any]) -> bool:
        """Whether an adapter with this ``adapter_config.json`` is this method (by default: its ``peft_type``)."""
        return cls.peft_type is not None and str(settings.get("peft_type")) == cls.peft_type

    @classmethod
    def from_peft(cls, settings: dict[str, Any], parts: dict[str, dict[str, torch.Tensor]],
                  name: str | None) -> Any:
        """The config of a PEFT adapter of this method (the inverse of :meth:`peft_config`).

        Args:
            settings: the adapter's ``adapter_config.json``.
            parts: its tensors by target path, then by PEFT's name on the target (``"lora_A.weight"``).
            name: the delta's name, or ``None`` for the default.

        Raises:
            DeltaConfigError: a PEFT option this method does not have.
        """
        raise DeltaConfigError(f"{cls.method!r} does not import PEFT adapters")

    @classmethod
    def refuse_peft_options(cls, settings: dict[str, Any], defaults: dict[str, Any]) -> None:
        """Raises :class:`DeltaConfigError` naming PEFT options set away from ``defaults`` (no equivalent here)."""
        unsupported = {k: settings[k] for k, v in defaults.items() if settings.get(k, v) not in (v, None)}
        if unsupported:
            raise DeltaConfigError(
                f"this PEFT adapter uses {unsupported}, which lightning_delta's {cls.method!r} does not have;"
                " load it with peft.PeftModel.from_pretrained(model, dir), or attach it through PEFT"
                " (attach(model, peft_config=...))")

    @classmethod
    def exports_to_peft(cls) -> bool:
        """Whether :meth:`peft_config` is implemented."""
        return cls.peft_config is not PeftConversion.peft_config


def require_linear(method: str, deltas: Iterable[Any]) -> None:
    """For PEFT exports of methods whose PEFT layers take only ``nn.Linear``: refuses ``Conv1D`` targets."""
    transposed = [d.target_path for d in deltas if getattr(d.module, "transposed", False)]
    if transposed:
        raise DeltaConfigError(f"PEFT's {method} takes only nn.Linear targets, not the Conv1D {transposed[:3]}:"
                               " this delta cannot be exported to PEFT's format")
