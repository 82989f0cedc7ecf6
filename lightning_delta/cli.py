"""The ``lightning-delta`` command: LightningCLI with fit / validate / test / predict driven by YAML.

Any LightningModule and LightningDataModule can be named with ``class_path``; the delta is
configured as a ``lightning_delta.DeltaCallback`` under ``trainer.callbacks``.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningCLI


class DeltaCLI(LightningCLI):
    """LightningCLI that may re-run ``fit`` into the same folder (the saved config is overwritten)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        super().__init__(*args, **kwargs)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-delta`` console script."""
    DeltaCLI(args=args)


if __name__ == "__main__":
    main()
